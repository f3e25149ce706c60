"""One client's view of a blob download: follow the verified prefix, or a relay from memory."""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from mirror.cache.transfer import (
    READ_SIZE,
    RELAY_BUFFER,
    WAKE_BATCH,
    DownloadFailed,
    State,
)

if TYPE_CHECKING:  # the download creates readers; readers only look at it
    from mirror.cache.download import BlobDownload


class _Relay:
    """Bytes passed through to one reader when there is no cache file to read them from."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._items: collections.deque[tuple[int, bytes]] = collections.deque()
        self._bytes = 0
        self._ended = False
        self._changed = asyncio.Condition()
        self._ending: asyncio.Task[None] | None = None

    async def put(self, offset: int, data: bytes) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._ended or self._bytes < RELAY_BUFFER)
            if not self._ended:
                self._items.append((offset, data))
                self._bytes += len(data)
                self._changed.notify_all()

    async def get(self) -> tuple[int, bytes] | None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._items or self._ended)
            if not self._items:
                return None
            offset, data = self._items.popleft()
            self._bytes -= len(data)
            self._changed.notify_all()
            return offset, data

    def end(self) -> None:
        self._ended = True

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        # Held here: the loop keeps only a weak reference to a task, which could vanish unrun.
        self._ending = asyncio.get_running_loop().create_task(notify())


class DownloadReader:
    """One client's view of a download in progress, with its own file descriptor."""

    def __init__(self, download: BlobDownload, fd: int) -> None:
        self._download = download
        self._fd = fd
        self._relay: _Relay | None = None
        self._want_end: int | None = None  # the end of the range chunks() was asked for
        self._pending: tuple[int, bytes] | None = None
        self._held_back: bytes | None = None

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def whole_on_disk(self) -> bool:
        """Every byte is verified and in the file behind fd: it can be sent with sendfile."""
        dl = self._download
        return dl.verified and not dl.passed_through and self._relay is None

    async def verdict(self) -> None:
        """Until the blob verified (returns) or failed (raises DownloadFailed). An empty body has
        no last byte to hold back: its response must wait for this before its headers."""
        dl = self._download
        while not (dl.verified or dl.state is State.FAILED):
            await dl.wait_verdict()
        if not dl.verified:
            assert dl.error is not None
            raise DownloadFailed(dl.error)

    def relay_from(self, start: int) -> None:
        self._relay = _Relay(start)

    async def offer(self, offset: int, data: bytes) -> None:
        if self._want_end is not None and offset >= self._want_end:
            return  # past what this reader asked for: buffering it would only hold the relay up
        if self._relay is not None and self._fd >= 0:
            await self._relay.put(offset, data)

    def end_relay(self) -> None:
        if self._relay is not None:
            self._relay.end()

    async def _relayed(self, relay: _Relay, pos: int, end: int) -> bytes:
        """The next bytes at `pos` from the relay (never past end - 1 before the verdict)."""
        dl = self._download
        while True:
            if self._pending is None:
                self._pending = await relay.get()
                if self._pending is None:  # the relay ended: verdict in, or failed
                    if dl.verified and self._held_back is not None:
                        return self._held_back
                    raise DownloadFailed(dl.error or RuntimeError("pass-through ended early"))
            offset, data = self._pending
            if self._held_back is not None or offset + len(data) <= pos:
                self._pending = None  # behind us, or past our end while we await the verdict
                continue
            if offset > pos:
                raise DownloadFailed(RuntimeError("pass-through skipped bytes"))
            piece = data[pos - offset : end - offset]
            if offset + len(data) >= end:  # holds our last byte: keep it until verified
                self._held_back = piece[-1:]
                piece = piece[:-1]
                self._pending = None
                if piece:
                    return piece
                continue
            self._pending = None
            return piece

    async def chunks(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes start..end (exclusive) as they land; the last one only once the blob verified.

        The last byte of the range, not of the blob: a range that ends before the blob does
        also waits for the whole blob's verdict. Its bytes cannot be checked on their own (the
        digest covers the whole blob), and a response completed before the verdict could be a
        complete success made of wrong bytes. Withholding the last byte turns a later mismatch
        into a short body, which every client treats as failed.

        Once verified, the bytes are served to the end even if the download then fails (the
        commit): they are proven, and this reader's fd keeps them readable.

        The caller closes the reader (and its fd): a consumer may stop early and go on with
        sendfile from the same fd, so the generator's own finalisation must not close it."""
        dl = self._download
        self._want_end = end
        pos = start
        while pos < end:
            if dl.state is State.FAILED and not dl.verified:
                assert dl.error is not None
                raise DownloadFailed(dl.error)
            relay = self._relay
            if relay is not None and pos >= relay.start:
                data = await self._relayed(relay, pos, end)
                pos += len(data)
                yield data
                continue
            limit = end if dl.verified else min(dl.contiguous, end - 1)
            if relay is not None:
                limit = min(limit, relay.start)
            if pos < limit:
                data = os.pread(self._fd, min(limit - pos, READ_SIZE), pos)
                if not data:
                    raise DownloadFailed(OSError("cache file shorter than expected"))
                pos += len(data)
                yield data
            elif pos < end - 1:
                await dl.wait_beyond(pos, min(pos + WAKE_BATCH, end - 1))
            else:  # only the held-back last byte is missing: nothing but the verdict helps
                await dl.wait_verdict()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._download.detach(self)
            if self._relay is not None:
                self._relay.end()  # a departed reader must never hold the relay up
