"""One client's view of a fill in progress: the written prefix as file spans, or a relay.

Spans of the fill's own file go to the kernel (sendfile) like a cached blob's: a follower
costs what a cached read costs, not a copy of every byte through Python.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from mirror.cache.fill import FillState
from mirror.cache.passthrough import Relay
from mirror.cache.transfer import WAKE_BATCH, DownloadFailed
from mirror.storage.blobstore import PrefixView, Segment

MAX_SPAN = 8 * 1024 * 1024  # one span of the file at a time, so a verdict is seen between


class Follower:
    def __init__(
        self, fill: FillState, view: PrefixView, on_close: Callable[[Follower], None]
    ) -> None:
        self._fill = fill
        self._view = view
        self._on_close = on_close
        self._closed = False
        self._relay: Relay | None = None
        self._want_end = 0  # the end of the range segments() was asked for
        self._pending: tuple[int, bytes] | None = None
        self._held_back: bytes | None = None

    @property
    def relay(self) -> Relay | None:
        return self._relay

    async def verdict(self) -> None:
        """Until the blob verified (returns) or failed (raises DownloadFailed). An empty body has
        no last byte to hold back: its response must wait for this before its headers."""
        fill = self._fill
        await fill.wait_verdict()
        if not fill.verified:
            raise fill.failure()

    def relay_from(self, start: int) -> None:
        """The fill passes through from `start`: what comes after is in memory, not the file."""
        self._relay = Relay(start)
        if self._want_end:
            self._relay.limit = self._want_end
        if self._closed:
            self._relay.end()

    async def segments(self, start: int, end: int) -> AsyncGenerator[Segment, None]:
        """Bytes start..end (exclusive) as they land; the last one only once the blob verified.

        The last byte of the range, not of the blob: a range that ends before the blob does
        also waits for the whole blob's verdict. Its bytes cannot be checked on their own (the
        digest covers the whole blob), and a response completed before the verdict could be a
        complete success made of wrong bytes. Withholding the last byte turns a later mismatch
        into a short body, which every client treats as failed.

        Once verified, the bytes are served to the end even if the fill then fails (the
        commit): they are proven, and this follower's view keeps them readable."""
        fill = self._fill
        self._want_end = end
        if self._relay is not None:
            self._relay.limit = end
        pos = start
        while pos < end:
            if not fill.running and not fill.verified:
                raise fill.failure()
            relay = self._relay
            if relay is not None and pos >= relay.start:
                data = await self._relayed(relay, pos, end)
                pos += len(data)
                yield data
                continue
            limit = end if fill.verified else min(fill.contiguous, end - 1)
            if relay is not None:
                limit = min(limit, relay.start)
            if pos < limit:
                count = min(limit - pos, MAX_SPAN)
                yield self._view.span(pos, count)
                pos += count
            elif pos < end - 1:
                await fill.wait_beyond(pos, min(pos + WAKE_BATCH, end - 1))
            else:  # only the held-back last byte is missing: nothing but the verdict helps
                await fill.wait_verdict()

    async def _relayed(self, relay: Relay, pos: int, end: int) -> bytes:
        """The next bytes at `pos` from the relay (never past end - 1 before the verdict)."""
        fill = self._fill
        while True:
            if self._pending is None:
                self._pending = await relay.get()
                if self._pending is None:  # the relay ended: verdict in, or failed
                    if fill.verified and self._held_back is not None:
                        return self._held_back
                    raise DownloadFailed(fill.error or RuntimeError("pass-through ended early"))
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._view.close()
        self._on_close(self)
        if self._relay is not None:
            self._relay.end()  # a departed follower must never hold the relay up
