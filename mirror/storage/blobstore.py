"""What every level that keeps blobs offers: look up, read, write atomically, remove.

A level is the local disk (FilesystemStore), its in-memory twin for tests (MemoryStore), or
a shared bucket. Reading yields segments: bytes, or a FileSpan the HTTP layer hands to the
kernel (sendfile) without the bytes ever entering Python. A writer fills a blob at arbitrary
offsets and makes it visible only through commit: before that no lookup can see it, and a
crash leaves nothing of it behind.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from mirror.oci.digest import Digest


class StoreError(Exception):
    """A write that could not be completed; nothing partial stays visible."""


class NoSpace(StoreError):
    """The store cannot grow: its disk (or quota) is full."""


class StoreUnavailable(StoreError):
    """A remote level could not be asked or did not answer well (5xx, a timeout, access
    denied, no credentials): it is skipped and the origin serves; no pull fails for it."""


class AlreadyStored(StoreError):
    """Another writer completed the same blob first: its copy stands, this one is dropped."""


@dataclass(frozen=True, slots=True)
class FileSpan:
    """`count` bytes of an open file from `offset`. The descriptor belongs to whoever yielded
    the span and stays open until they are closed; a consumer that needs it longer (a thread)
    takes a duplicate."""

    fd: int
    offset: int
    count: int


Segment = bytes | FileSpan


class OpenBlob(Protocol):
    """A committed blob, readable until closed even if it is removed meanwhile."""

    @property
    def size(self) -> int: ...

    def read(self, start: int, end: int) -> AsyncGenerator[Segment, None]:
        """Bytes [start, end) in order."""
        ...

    def close(self) -> None: ...


class BlobWriter(Protocol):
    """A blob being written; it becomes one only through commit."""

    async def write(self, offset: int, data: bytes) -> None:
        """Store `data` at `offset`. Raises NoSpace when full, StoreError on other failures."""
        ...

    async def commit(self, digest: Digest) -> None:
        """Make the bytes visible as `digest`, whole or not at all. The caller has verified
        them; a store that can check them again (a checksum on upload) does."""
        ...

    async def discard(self) -> None:
        """Forget what was written (idempotent; nothing once committed)."""
        ...


class PrefixView(Protocol):
    """What a fill in progress offers its followers: the bytes written so far, from a
    handle of their own that stays readable whatever the writer does next."""

    def span(self, offset: int, count: int) -> Segment:
        """Bytes already written at [offset, offset + count)."""
        ...

    def pread(self, offset: int, count: int) -> bytes:
        """The same bytes as a copy; blocking, safe on a worker thread (for hashing)."""
        ...

    def copy(self) -> PrefixView:
        """Another view of the same fill, of its own (closed on its own)."""
        ...

    def close(self) -> None: ...


class LocalWriter(BlobWriter, Protocol):
    """A writer on the level that serves clients: followers read what it has written."""

    @property
    def committed(self) -> bool:
        """Renamed into place, even if what came after the rename (a sync) failed."""
        ...

    @property
    def resumed_at(self) -> int:
        """Leading bytes an earlier, interrupted fill of the same digest left: not verified,
        so the caller hashes them and checks them with the rest."""
        ...

    def note_prefix(self, prefix: int) -> None:
        """Bytes [0, prefix) are written (what a later fill may go on from)."""
        ...

    def keep(self, prefix: int) -> None:
        """Interrupted with [0, prefix) written: leave them for a later fill (where the store
        can; elsewhere this is a discard)."""
        ...

    def view(self) -> PrefixView: ...


class BlobStore(Protocol):
    async def stat(self, digest: Digest) -> int | None:
        """The blob's size, or None when this level does not have it."""
        ...

    async def open(self, digest: Digest) -> OpenBlob | None: ...

    async def create(self, *, size: int | None = None, digest: Digest | None = None) -> BlobWriter:
        """A writer. `size` and `digest`, when known, let a store choose how to write (a
        bucket: one PUT or parts, sent as they fill); commit still names the digest."""
        ...

    async def remove(self, digest: Digest) -> int | None:
        """Delete a blob; the bytes freed, None when it was not there."""
        ...


async def read_bytes(blob: OpenBlob, start: int, end: int) -> bytes:
    """Bytes [start, end) of an open blob (file spans are read on a thread). A file blob is one
    span, so its bytes are one read and never copied again: an upload's part is held once."""
    pieces: list[bytes] = []
    async for segment in blob.read(start, end):
        if isinstance(segment, FileSpan):
            pieces.append(await asyncio.to_thread(_pread_all, segment))
        else:
            pieces.append(bytes(segment))
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _pread_all(span: FileSpan) -> bytes:
    data = os.pread(span.fd, span.count, span.offset)
    if len(data) != span.count:
        raise StoreError("the file is shorter than its span")
    return data


class LocalStore(BlobStore, Protocol):
    """The level clients are served from while it fills: its writers can be followed."""

    async def create(
        self, *, size: int | None = None, digest: Digest | None = None
    ) -> LocalWriter: ...
