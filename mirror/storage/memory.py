"""The in-memory twin of the filesystem store, for tests: the same contract, no disk.

`capacity` bounds the bytes held (committed and being written), so a full disk can be
played without one; `fail_commit` makes commits fail after the bytes were written.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from mirror.oci.digest import Digest
from mirror.storage.blobstore import NoSpace, StoreError
from mirror.storage.metastore import TagRecord


class MemoryBlob:
    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    async def read(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        if end > start:
            yield self._data[start:end]

    def close(self) -> None:
        pass


class MemoryView:
    def __init__(self, data: bytearray) -> None:
        self._data = data  # shared with the writer: the bytes written so far

    def span(self, offset: int, count: int) -> bytes:
        return self.pread(offset, count)

    def pread(self, offset: int, count: int) -> bytes:
        if offset + count > len(self._data):
            raise StoreError("read past what was written")
        return bytes(self._data[offset : offset + count])

    def copy(self) -> MemoryView:
        return MemoryView(self._data)

    def close(self) -> None:
        pass


class MemoryWriter:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._data = bytearray()
        self._committed = False
        self._discarded = False

    @property
    def committed(self) -> bool:
        return self._committed

    @property
    def resumed_at(self) -> int:
        return 0  # memory does not outlive the process: nothing to go on from

    def note_prefix(self, prefix: int) -> None:
        pass

    def keep(self, prefix: int) -> None:
        self.discard_now()

    @property
    def held(self) -> int:
        return 0 if self._committed or self._discarded else len(self._data)

    async def write(self, offset: int, data: bytes) -> None:
        if self._committed or self._discarded:
            raise StoreError("the writer is closed")
        grow = max(0, offset + len(data) - len(self._data))
        if self._store.used() + grow > self._store.capacity:
            raise NoSpace("the store is full")
        if offset > len(self._data):
            self._data.extend(bytes(offset - len(self._data)))
        self._data[offset : offset + len(data)] = data

    def view(self) -> MemoryView:
        return MemoryView(self._data)

    async def commit(self, digest: Digest) -> None:
        if self._discarded:
            raise StoreError("the writer was discarded")
        if self._store.fail_commit:
            raise StoreError("injected: the commit failed")
        self._store.blobs.setdefault(digest.hex, bytes(self._data))
        self._committed = True
        self._store.writers.discard(self)

    async def discard(self) -> None:
        self.discard_now()

    def discard_now(self) -> None:
        if not self._committed:
            self._discarded = True
        self._store.writers.discard(self)


class MemoryStore:
    def __init__(self, capacity: int = 1 << 62) -> None:
        self.capacity = capacity
        self.fail_commit = False
        self.blobs: dict[str, bytes] = {}
        self.writers: set[MemoryWriter] = set()
        self._types: dict[str, str] = {}
        self._tags: dict[tuple[str, str, str], TagRecord] = {}

    async def writable(self) -> bool:
        return True

    def used(self) -> int:
        return sum(map(len, self.blobs.values())) + sum(w.held for w in self.writers)

    async def stat(self, digest: Digest) -> int | None:
        data = self.blobs.get(digest.hex)
        return None if data is None else len(data)

    async def open(self, digest: Digest) -> MemoryBlob | None:
        data = self.blobs.get(digest.hex)
        return None if data is None else MemoryBlob(data)

    async def create(
        self, *, size: int | None = None, digest: Digest | None = None
    ) -> MemoryWriter:
        writer = MemoryWriter(self)
        self.writers.add(writer)
        return writer

    async def remove(self, digest: Digest) -> int | None:
        data = self.blobs.pop(digest.hex, None)
        self._types.pop(digest.hex, None)
        return None if data is None else len(data)

    async def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        body, media_type = self.blobs.get(digest.hex), self._types.get(digest.hex)
        return None if body is None or media_type is None else (body, media_type)

    async def write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        self._types[digest.hex] = media_type
        self.blobs[digest.hex] = body

    async def read_tag(self, registry: str, name: str, tag: str) -> TagRecord | None:
        return self._tags.get((registry, name, tag))

    async def write_tag(self, registry: str, name: str, tag: str, record: TagRecord) -> None:
        self._tags[(registry, name, tag)] = record
