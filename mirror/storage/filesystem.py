"""The local disk as a store: atomic, crash-safe writes of content-addressed files.

Every call that touches the disk runs on a worker thread: a slow disk (or a kernel throttling
dirty pages) must stall one transfer, not the event loop and every client on it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from mirror.oci.digest import Digest
from mirror.storage.blobstore import FileSpan, NoSpace, StoreError
from mirror.storage.layout import Layout
from mirror.storage.metastore import TagRecord
from mirror.storage.threads import settled

_FULL = (errno.ENOSPC, errno.EDQUOT)
NOTE_EVERY = 4 * 1024 * 1024  # how much of a fill a restart may have to fetch again
PARTIAL_MAX_AGE = 86400.0  # an interrupted fill nobody asked for again within this is swept


class FileBlob:
    """A committed blob opened for reading: one descriptor, sent by the kernel."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def read(self, start: int, end: int) -> AsyncGenerator[FileSpan, None]:
        if end > start:
            yield FileSpan(self._fd, start, end - start)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileView:
    """A follower's own descriptor on a file being filled: readable after the rename into
    place and after an unlink, until closed."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def span(self, offset: int, count: int) -> FileSpan:
        return FileSpan(self._fd, offset, count)

    def pread(self, offset: int, count: int) -> bytes:
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise StoreError("cache file shorter than its written prefix")
        return data

    def copy(self) -> FileView:
        return FileView(os.dup(self._fd))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileWriter:
    """A fill at arbitrary offsets; a blob only once committed. With its digest known it is
    written under partial/, where an interruption leaves it for the next fill to go on from:
    how far it is contiguous from byte 0 is noted beside it as it grows (after the bytes: a
    kill -9 leaves the page cache, so the note never claims more than is there)."""

    def __init__(
        self,
        layout: Layout,
        path: Path,
        fd: int,
        fsync: Callable[[int], None],
        note: Path | None = None,
        resumed_at: int = 0,
    ) -> None:
        self._layout = layout
        self._fsync = fsync
        self._path = path
        self._fd = fd
        self._note = note  # partial/<hex>.prefix, for a fill that can be resumed
        self._noted = resumed_at
        self._resumed_at = resumed_at
        self._committed = False  # renamed into place: the path no longer names it
        self._kept = False
        self._closed = False

    @property
    def committed(self) -> bool:
        return self._committed

    @property
    def resumed_at(self) -> int:
        """Bytes [0, resumed_at) were written by an earlier fill, interrupted: not verified
        (the digest covers the whole blob), so they are hashed, and checked with the rest."""
        return self._resumed_at

    async def write(self, offset: int, data: bytes) -> None:
        # Settled: a cancelled download closes the descriptor next, and a write still running
        # in its thread could then land in whatever file reuses the number.
        await settled(lambda: self._pwrite(data, offset))

    def _pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            if exc.errno in _FULL:
                raise NoSpace("the cache disk is full") from exc
            raise StoreError(f"cannot write the cache file: {exc.strerror}") from exc

    def note_prefix(self, prefix: int, now: bool = False) -> None:
        """Bytes [0, prefix) are written: noted every NOTE_EVERY bytes (or `now`), so that a
        restart loses at most that much of the fill. A few bytes into the page cache."""
        if self._note is None or (prefix < self._noted + NOTE_EVERY and not now):
            return
        self._noted = prefix
        try:
            tmp = self._note.with_suffix(".prefix-new")
            tmp.write_text(str(prefix))
            os.replace(tmp, self._note)
        except OSError:
            pass  # a note not written costs a resume from an earlier byte, nothing else

    def view(self) -> FileView:
        return FileView(os.dup(self._fd))

    async def commit(self, digest: Digest) -> None:
        """fsync, then rename into place: the blob appears whole or not at all. Raised (a
        failed directory sync, a cancel) after the rename, `committed` is already true."""
        final = self._layout.blob(digest)
        try:
            await settled(lambda: self._commit_sync(final))
        except OSError as exc:
            raise StoreError(f"cannot commit the cache file: {exc.strerror}") from exc
        finally:
            self._close()
        self._drop_note()

    def _commit_sync(self, final: Path) -> None:
        self._fsync(self._fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, final)
        self._committed = True
        _fsync_dir(final.parent)

    def keep(self, prefix: int) -> None:
        """Interrupted (a shutdown, an outage) with [0, prefix) written: leave them for a
        later fill of the same digest to go on from."""
        if self._note is not None and not self._committed and prefix > 0:
            self._kept = True
            self.note_prefix(prefix, now=True)
        self._close()

    async def discard(self) -> None:
        self.discard_now()

    def discard_now(self) -> None:
        """Synchronously: what a cancelled download can still do on its way out."""
        self._close()
        if self._committed or self._kept:
            return  # the path is the blob's now, or a later fill's to go on from
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        self._drop_note()

    def _drop_note(self) -> None:
        if self._note is not None:
            try:
                os.unlink(self._note)
            except FileNotFoundError:
                pass

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class FilesystemStore:
    """Blobs, manifest media types and tag records under one directory (see Layout)."""

    def __init__(self, layout: Layout, fsync: Callable[[int], None] = os.fsync) -> None:
        """`fsync`: how a blob's bytes are made durable (a test can make the disk slow)."""
        self.layout = layout
        self._fsync = fsync

    def prepare(self) -> int:
        """Create the tree and sweep tmp/: leftovers of a crash are never served. Blocking
        (start-up). Returns the number of files swept."""
        layout = self.layout
        for path in (layout.blobs, layout.tmp, layout.partial, layout.root / "tags"):
            path.mkdir(parents=True, exist_ok=True)
        swept = 0
        for entry in os.scandir(layout.tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            swept += 1
        # Interrupted fills stay for the next one, unless nobody has wanted them for a day.
        too_old = time.time() - PARTIAL_MAX_AGE
        for entry in os.scandir(layout.partial):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < too_old:
                    os.unlink(entry.path)
                    swept += 1
            except FileNotFoundError:
                pass
        return swept

    async def writable(self) -> bool:
        return await asyncio.to_thread(self._probe)

    def _probe(self) -> bool:
        probe = self.layout.tmp / f".probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError:
            return False

    # -- blobs -------------------------------------------------------------------------------

    async def stat(self, digest: Digest) -> int | None:
        return await asyncio.to_thread(self._size, digest)

    def _size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.layout.blob(digest)).st_size
        except FileNotFoundError:
            return None

    async def open(self, digest: Digest) -> FileBlob | None:
        return await asyncio.to_thread(self._open, digest)

    def _open(self, digest: Digest) -> FileBlob | None:
        try:
            fd = os.open(self.layout.blob(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return FileBlob(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise

    async def create(self, *, size: int | None = None, digest: Digest | None = None) -> FileWriter:
        """With `digest`: the interrupted fill of it, if one was left, to go on from."""
        return await asyncio.to_thread(self._create, digest)

    def _create(self, digest: Digest | None) -> FileWriter:
        if digest is None:
            path = self.layout.tmp / f"{secrets.token_hex(12)}.part"
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            return FileWriter(self.layout, path, self._open_new(path, flags), self._fsync)
        path, note = self.layout.partial_blob(digest), self.layout.partial_prefix(digest)
        resumed = self._resumable(path, note)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if resumed else os.O_TRUNC)
        fd = self._open_new(path, flags)
        return FileWriter(self.layout, path, fd, self._fsync, note, resumed)

    @staticmethod
    def _open_new(path: Path, flags: int) -> int:
        try:
            return os.open(path, flags, 0o644)
        except OSError as exc:  # EMFILE, EROFS, ENOSPC: no fill can start
            raise StoreError(f"cannot create a cache file: {exc.strerror}") from exc

    @staticmethod
    def _resumable(path: Path, note: Path) -> int:
        """How many leading bytes an interrupted fill left (0: none, or no trustworthy note)."""
        try:
            noted = int(note.read_text())
            return max(0, min(noted, os.stat(path).st_size))
        except (OSError, ValueError):
            return 0

    async def remove(self, digest: Digest) -> int | None:
        return await asyncio.to_thread(self._remove, digest)

    def _remove(self, digest: Digest) -> int | None:
        path = self.layout.blob(digest)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return None
        try:
            os.unlink(self.layout.manifest_type(digest))
        except FileNotFoundError:
            pass
        return size

    # -- manifests ---------------------------------------------------------------------------

    async def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        return await asyncio.to_thread(self._read_manifest, digest)

    def _read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        try:
            media_type = self.layout.manifest_type(digest).read_text()
            body = self.layout.blob(digest).read_bytes()
        except FileNotFoundError:
            return None
        return body, media_type

    async def write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        """Media type first, then the bytes: a manifest readable at all has its type."""
        await asyncio.to_thread(self._write_manifest, digest, body, media_type)

    def _write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        self._write_small(self.layout.manifest_type(digest), media_type.encode())
        self._write_small(self.layout.blob(digest), body)

    # -- tags --------------------------------------------------------------------------------

    async def read_tag(self, registry: str, name: str, tag: str) -> TagRecord | None:
        return await asyncio.to_thread(self._read_tag, registry, name, tag)

    def _read_tag(self, registry: str, name: str, tag: str) -> TagRecord | None:
        try:
            doc = json.loads(self.layout.tag(registry, name, tag).read_bytes())
            return TagRecord(
                str(doc["digest"]), str(doc["media_type"]), int(doc["size"]),
                float(doc["fetched_at"]),
            )  # fmt: skip
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    async def write_tag(self, registry: str, name: str, tag: str, record: TagRecord) -> None:
        body = json.dumps(
            {"digest": record.digest, "media_type": record.media_type, "size": record.size,
             "fetched_at": record.fetched_at}
        ).encode()  # fmt: skip
        await asyncio.to_thread(self._write_small, self.layout.tag(registry, name, tag), body)

    def _write_small(self, final: Path, body: bytes) -> None:
        """Raises OSError (ENOSPC included): for small files the caller decides what it means."""
        path = self.layout.tmp / f"{secrets.token_hex(12)}.part"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
