"""One upstream download of one blob into a temp file, followed live by any number of readers.

The download is a task owned by the blob service, never by a request: readers come and go
(hang up, time out) without touching it. Large blobs are fetched as several concurrent Range
requests written at their offsets; readers follow the contiguous written prefix. The sha256 is
taken over that prefix as it grows, and no reader is given the last byte of its response before
the whole blob has been verified, so a wrong blob is never a complete success.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from collections.abc import Awaitable, Callable

import aiohttp
import structlog

from mirror.cache.pieces import Piece, Pieces, plan_pieces
from mirror.cache.prefix_hash import PrefixHasher
from mirror.cache.reader import DownloadReader
from mirror.cache.transfer import UNKNOWN_END, DigestMismatch, DownloadFailed, State
from mirror.cache.waiters import PrefixWaiters
from mirror.config import UpstreamConfig
from mirror.oci.digest import Digest
from mirror.storage.store import FilesystemStore, StoreError, TempFile
from mirror.upstream.client import BlobBody, RegistryClient
from mirror.upstream.errors import UpstreamBodyError, UpstreamError, UpstreamUnavailable

log = structlog.get_logger("mirror.download")

FIRST_REQUEST = 4 * 1024 * 1024  # the first Range: most configs and small layers fit whole


class _NoSpace(StoreError):
    """The cache file cannot grow: the disk (or quota) is full even after evicting."""


class _RangesIgnored(Exception):
    """A Range request after the first was answered with the whole blob."""


def _first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_cause(first) if isinstance(first, BaseExceptionGroup) else first


_RETRYABLE = (UpstreamUnavailable, UpstreamBodyError, aiohttp.ClientError, TimeoutError, OSError)


class BlobDownload:
    def __init__(
        self,
        digest: Digest,
        registry: str,
        name: str,
        client: RegistryClient,
        store: FilesystemStore,
        config: UpstreamConfig,
        on_finish: Callable[[BlobDownload], None],
        make_room: Callable[[int], Awaitable[bool]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.digest = digest
        self.registry = registry
        self.name = name
        self._client = client
        self._store = store
        self._config = config
        self._on_finish = on_finish
        self._make_room = make_room
        self._sleep = sleep
        self._readers: set[DownloadReader] = set()
        self.passed_through = False
        # The whole blob hashed to its digest: readers may finish. Set before the commit (or at
        # the end of a pass-through), so it is the one thing readers need to look at.
        self.verified = False
        # One stream left (no Range support, or not a reliable one): an answer with the whole
        # blob is usable, by skipping what is already written.
        self._single = False
        self.state = State.RUNNING
        self.error: BaseException | None = None
        self.size: int | None = None
        self.contiguous = 0
        self.streams = 0
        self.retries = 0
        self._written = 0
        self._temp: TempFile = store.new_temp()
        self._pieces = Pieces(Piece(0, 0, 0), iter(()))
        self._hasher = PrefixHasher(self._temp.fd)
        self._sized = asyncio.Event()
        self._waiters = PrefixWaiters()
        self._done = asyncio.get_running_loop().create_future()

    # -- for readers ---------------------------------------------------------------------------

    async def wait_sized(self) -> int:
        """The size as soon as the upstream said it; raises DownloadFailed if it failed first."""
        await self._sized.wait()
        if self.size is None:
            assert self.error is not None
            raise DownloadFailed(self.error)
        return self.size

    async def wait_done(self) -> None:
        """Until committed (returns) or failed (raises DownloadFailed)."""
        await asyncio.shield(self._done)
        if self.state is State.PASSED:
            raise DownloadFailed(StoreError("the cache disk is full: served, not cached"))
        if self.state is State.FAILED:
            assert self.error is not None
            raise DownloadFailed(self.error)

    def reader(self) -> DownloadReader:
        """Call without awaiting in between lookup and here: it takes its own fd, so the temp file
        stays readable whatever the download does next (rename on commit, unlink on failure)."""
        reader = DownloadReader(self, os.dup(self._temp.fd))
        self._readers.add(reader)
        return reader

    async def wait_beyond(self, pos: int, needed: int) -> None:
        """Until the prefix reaches `needed`, a tick passes with progress past `pos`, or the
        blob is verified, or the download ends."""
        if self.state is not State.RUNNING or self.verified or self.contiguous >= needed:
            return
        await self._waiters.wait(pos, needed)

    async def wait_verdict(self) -> None:
        """Until the blob is verified or the download ends; new bytes alone wake nobody."""
        await self.wait_beyond(UNKNOWN_END, UNKNOWN_END)

    def detach(self, reader: DownloadReader) -> None:
        """A reader is done (or gone): the relay must never wait on it."""
        self._readers.discard(reader)

    # -- the download ------------------------------------------------------------------------

    async def run(self) -> None:
        started = time.monotonic()
        self._hasher.start()
        try:
            try:
                await self._fetch()
            except _NoSpace as exc:
                await self._pass_through(exc)
                return
            await self._commit()
            log.info(
                "blob_committed", digest=str(self.digest), registry=self.registry,
                bytes=self.size, streams=self.streams, retries=self.retries,
                seconds=round(time.monotonic() - started, 3),
            )  # fmt: skip
        except asyncio.CancelledError:
            self._finish(State.FAILED, DownloadFailed(RuntimeError("download cancelled")))
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is handed to the readers
            log.warning(
                "blob_download_failed", digest=str(self.digest), registry=self.registry,
                error=str(exc), error_type=type(exc).__name__, bytes=self.contiguous,
            )  # fmt: skip
            self._finish(State.FAILED, exc)

    async def _fetch(self) -> None:
        cfg = self._config
        first_len = min(cfg.chunk_size, FIRST_REQUEST)
        try:
            first = await self._client.open_blob(
                self.registry, self.name, str(self.digest), 0, first_len - 1
            )
        except UpstreamError as exc:
            if exc.status != 416:
                raise
            # An empty blob has no byte 0, so registries answer 416 to the first Range (Go's
            # ServeContent does): ask for the whole blob instead.
            first = await self._client.open_blob(self.registry, self.name, str(self.digest))
        self.streams = 1
        if not first.ranged:  # the upstream ignores Range: one stream, shared by every reader
            end = first.total if first.total is not None else UNKNOWN_END
            await self._one_stream(Piece(0, end, 0), first)
            if self.size is None:
                self._set_size(self.contiguous)
            return
        if first.offset != 0 or first.total is None:
            first.close()
            raise UpstreamBodyError("upstream answered a Range request with an unusable 206")
        total = first.total
        self._set_size(total)
        head = Piece(0, min(first_len, total), 0)
        rest = plan_pieces(
            total, head.end, cfg.chunk_size, cfg.ranged_threshold, cfg.ranged_streams
        )
        self._pieces = Pieces(head, rest)
        try:
            await self._ranged(head, first)
        except _RangesIgnored:
            # Honoured once, ignored later: no later answer can be trusted to be a range.
            log.info(
                "upstream_ranges_unreliable", digest=str(self.digest), registry=self.registry,
                resume_at=self.contiguous,
            )  # fmt: skip
            await self._one_stream(Piece(self.contiguous, total, self.contiguous), None)

    async def _ranged(self, head: Piece, first: BlobBody) -> None:
        """ranged_streams streams in all, the first response's included: each takes the next
        piece when its own is done."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._stream(head, first))
                for _ in range(self._config.ranged_streams - 1):
                    group.create_task(self._stream(None, None))
        except ExceptionGroup as group:
            if group.subgroup(_RangesIgnored) is not None:
                raise _RangesIgnored from None
            raise _first_cause(group) from None  # the failure that stopped the others

    async def _stream(self, piece: Piece | None, body: BlobBody | None) -> None:
        if piece is None:
            piece = self._pieces.take()
            if piece is None:
                return  # fewer pieces than streams
            self.streams += 1
        while piece is not None:
            await self._fetch_piece(piece, body)
            body = None
            self._pieces.finish(piece)
            piece = self._pieces.take()

    async def _one_stream(self, piece: Piece, body: BlobBody | None) -> None:
        self._single = True
        self._pieces = Pieces(piece, iter(()))
        if self.size is None and piece.end != UNKNOWN_END:
            self._set_size(piece.end)
        await self._fetch_piece(piece, body)

    async def _fetch_piece(self, piece: Piece, body: BlobBody | None) -> None:
        """Fill piece.pos..end, resuming from the last byte written when a stream breaks."""
        failures = 0
        while piece.pos < piece.end:
            try:
                if body is None:
                    end = None if piece.end == UNKNOWN_END else piece.end - 1
                    body = await self._client.open_blob(
                        self.registry, self.name, str(self.digest), piece.pos, end
                    )
                skip = self._skip(body, piece)
                async for data in body.response.content.iter_any():
                    if skip:
                        dropped = min(skip, len(data))
                        skip -= dropped
                        self._client.record_bytes(self.registry, dropped)
                        data = data[dropped:]
                        if not data:
                            continue
                    room = piece.end - piece.pos
                    await self._sink(piece, data if len(data) <= room else data[:room])
                    failures = 0
                    if piece.pos >= piece.end:
                        break
                if piece.pos < piece.end and piece.end != UNKNOWN_END:
                    raise UpstreamBodyError(f"body ended at byte {piece.pos} of {piece.end}")
                piece.end = piece.pos  # unknown length: the end of the body is the end
            except UpstreamError as exc:
                if not exc.transient or failures >= self._config.retries:
                    raise
                failures += 1
                await self._backoff(failures, exc.retry_after)
            except _RETRYABLE:
                if failures >= self._config.retries:
                    raise
                failures += 1
                await self._backoff(failures, None)
            finally:
                if body is not None:
                    body.close()  # never reused: a half-read connection is not worth keeping
                    body = None
        if body is not None:
            body.close()  # an empty piece (an empty blob) never entered the loop

    def _skip(self, body: BlobBody, piece: Piece) -> int:
        """How many leading bytes of this answer are before piece.pos (written already)."""
        if body.ranged:
            if body.offset > piece.pos:
                raise UpstreamBodyError("upstream answered a Range at the wrong offset")
            return piece.pos - body.offset
        if not self._single:
            raise _RangesIgnored
        return piece.pos  # the whole blob again: what was written is skipped, not rewritten

    async def _backoff(self, failures: int, retry_after: float | None) -> None:
        self.retries += 1
        if retry_after is not None:  # never sooner than the origin asked: it would fail again
            await self._sleep(min(retry_after, 30.0) + 0.25 * random.random())
            return
        await self._sleep(min(0.1 * 2 ** (failures - 1), 5.0) * (0.5 + random.random()))

    async def _sink(self, piece: Piece, data: bytes) -> None:
        if self.passed_through:
            await self._relay(piece, data)
        else:
            await self._write(piece, data)

    async def _write(self, piece: Piece, data: bytes) -> None:
        offset = piece.pos
        try:
            self._temp.pwrite(data, offset)
        except OSError as exc:  # disk full or failing: not the upstream's fault, never retried
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"cannot write the cache file: {exc.strerror}") from exc
            if not await self._make_room(max(0, (self.size or 0) - self._written)):
                raise _NoSpace("the cache disk is full") from exc
            try:
                self._temp.pwrite(data, offset)
            except OSError as again:
                raise _NoSpace("the cache disk is full") from again
        piece.pos += len(data)
        self._written += len(data)
        self._client.record_bytes(self.registry, len(data))
        prefix = self._pieces.prefix()
        if prefix > self.contiguous:
            self.contiguous = prefix
            self._hasher.advance(prefix)
            self._waiters.grew(prefix)

    async def _pass_through(self, cause: _NoSpace) -> None:
        """No room for the cache file: finish the readers we have from memory instead.

        The written prefix stays readable in the temp file; from there one sequential stream
        goes on, still hashed, into a bounded buffer per reader (the slowest reader paces it:
        a degraded mode that keeps its clients served rather than fast). The download leaves
        the service at once, so the next request tries caching again.
        """
        self.passed_through = True
        self._on_finish(self)
        log.warning(
            "cache_full_passthrough", digest=str(self.digest), registry=self.registry,
            cached_prefix=self.contiguous, readers=len(self._readers), error=str(cause),
        )  # fmt: skip
        start = self.contiguous
        await self._hasher.finish(start)  # the relay goes on hashing inline from here
        for reader in self._readers:
            reader.relay_from(start)
        self._waiters.wake_all()
        if self.size is None:
            raise cause  # a size-less stream cannot be followed past the file; rare enough
        self._single = True  # one sequential stream from here, whatever the upstream supports
        await self._fetch_piece(Piece(start, self.size, start), None)
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(self.digest, actual)
        self.verified = True
        self._finish(State.PASSED, None)

    async def _relay(self, piece: Piece, data: bytes) -> None:
        offset = piece.pos
        piece.pos += len(data)
        self._client.record_bytes(self.registry, len(data))
        self._hasher.update(data)  # one sequential stream: always in order, hashed inline
        for reader in list(self._readers):
            await reader.offer(offset, data)

    def _set_size(self, size: int) -> None:
        self.size = size
        self._sized.set()

    async def _commit(self) -> None:
        assert self.size is not None and self.contiguous == self.size
        actual = await self._hasher.finish(self.size)
        if actual != self.digest.hex:
            raise DigestMismatch(self.digest, actual)
        # The bytes are proven: readers may finish now; the fsync and rename that make the
        # file durable and visible do not concern what they were sent.
        self.verified = True
        self._waiters.wake_all()
        try:
            await self._store.commit(self._temp, self.digest)
        except BaseException:
            # Renamed into place before what failed (the directory's fsync) or was cancelled (the
            # store lets its thread finish first): the blob is whole, verified and visible.
            if self._temp.committed:
                self._finish(State.COMMITTED, None)
            raise
        self._finish(State.COMMITTED, None)

    def _finish(self, state: State, error: BaseException | None) -> None:
        if self.state is not State.RUNNING:
            return
        self.state = state
        self.error = error
        self._hasher.cancel()
        if not self.passed_through:
            self._on_finish(self)  # synchronously: no reader may attach to a finished download
        if state is State.COMMITTED:
            self._temp.close()
        else:
            self._store.discard(self._temp)
        self._sized.set()
        if not self._done.done():
            self._done.set_result(None)
        self._waiters.wake_all()
        for reader in self._readers:
            reader.end_relay()
