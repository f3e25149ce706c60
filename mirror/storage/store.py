"""The filesystem store: atomic, verified, crash-safe writes of content-addressed files."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from mirror.oci.digest import Digest
from mirror.storage.layout import Layout


class StoreError(Exception):
    """A write that could not be completed; nothing partial stays visible."""


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    media_type: str
    size: int
    fetched_at: float  # wall clock: it must survive restarts


class TempFile:
    """A file in tmp/ being filled at arbitrary offsets; becomes a blob only through commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.closed = False
        self.committed = False  # renamed into place: the path no longer names it

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class FilesystemStore:
    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)

    def prepare(self) -> int:
        """Create the tree and sweep tmp/: leftovers of a crash are never served. Returns the
        number of files swept."""
        for path in (self.layout.blobs, self.layout.tmp, self.layout.root / "tags"):
            path.mkdir(parents=True, exist_ok=True)
        swept = 0
        for entry in os.scandir(self.layout.tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            swept += 1
        return swept

    def writable(self) -> bool:
        probe = self.layout.tmp / f".probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError:
            return False

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.layout.blob(digest)

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.layout.blob(digest)).st_size
        except FileNotFoundError:
            return None

    def new_temp(self) -> TempFile:
        return TempFile(self.layout.tmp / f"{secrets.token_hex(12)}.part")

    async def commit(self, temp: TempFile, digest: Digest) -> Path:
        """fsync, then rename into place: the blob appears whole or not at all.

        Cancelled, it still returns (by raising) only once its thread is done with the file:
        a thread cannot be stopped, and the caller's next step is to close the descriptor the
        thread is syncing (or unlink the path it renames). temp.committed then tells whether
        the rename happened.
        """
        final = self.layout.blob(digest)
        thread = asyncio.ensure_future(asyncio.to_thread(self._commit_sync, temp, final))
        try:
            await asyncio.shield(thread)
        except asyncio.CancelledError:
            while not thread.done():
                try:
                    await asyncio.wait([thread])
                except asyncio.CancelledError:
                    continue  # cancelled again: the thread is no more stoppable than before
            if not thread.cancelled():
                thread.exception()  # its outcome is in temp.committed; the cancel wins
            raise
        return final

    @staticmethod
    def _commit_sync(temp: TempFile, final: Path) -> None:
        os.fsync(temp.fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp.path, final)
        temp.committed = True
        _fsync_dir(final.parent)

    def discard(self, temp: TempFile) -> None:
        temp.close()
        if temp.committed:
            return  # the path is the blob's now
        try:
            os.unlink(temp.path)
        except FileNotFoundError:
            pass

    def remove_blob(self, digest: Digest) -> int | None:
        """Delete a blob (eviction); returns the bytes freed, None when it was already gone."""
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

    def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        try:
            media_type = self.layout.manifest_type(digest).read_text()
            body = self.layout.blob(digest).read_bytes()
        except FileNotFoundError:
            return None
        return body, media_type

    async def write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        """Media type first, then the bytes: a manifest readable at all has its type."""
        await asyncio.to_thread(self._write_manifest_sync, digest, body, media_type)

    def _write_manifest_sync(self, digest: Digest, body: bytes, media_type: str) -> None:
        self._write_small(self.layout.manifest_type(digest), media_type.encode())
        self._write_small(self.layout.blob(digest), body)

    # -- tags --------------------------------------------------------------------------------

    def read_tag(self, registry: str, name: str, tag: str) -> TagRecord | None:
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
        temp = self.new_temp()
        try:
            temp.pwrite(body, 0)
            os.fsync(temp.fd)
            temp.close()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp.path, final)
        except BaseException:
            self.discard(temp)
            raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
