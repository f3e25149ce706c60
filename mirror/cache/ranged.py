"""Filling a blob from a byte source: concurrent Range requests, resumed where they broke off.

Long-haul links cap throughput per connection, so a large blob is fetched as several Range
requests at once, each written at its offset. A piece that breaks off is asked for again from
the byte it reached, under one retry policy (this is its only owner). A source that ignores
Range gets one stream, whose repeats skip what is already written; one that honours only the
first Range falls back to that too.

Writes go through a sink (the store writer) off the event loop. Each piece keeps at most one
write in flight and gathers what arrives meanwhile into the next: under load writes batch by
themselves, and a lone chunk is written at once, never held back for company.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from mirror.cache.pieces import Piece, Pieces, plan_pieces
from mirror.cache.transfer import UNKNOWN_END
from mirror.config import UpstreamConfig
from mirror.upstream.errors import UpstreamBodyError, UpstreamError, UpstreamUnavailable
from mirror.upstream.retry import RetryPolicy
from mirror.upstream.source import RangeBody, RangeSource

log = structlog.get_logger("mirror.ranged")

FIRST_REQUEST = 4 * 1024 * 1024  # the first Range: most configs and small layers fit whole
BACKLOG = 4 * 1024 * 1024  # bytes a piece may hold unwritten before it stops reading
GATHER = 256 * 1024  # a write of at least this much goes at once ...
GATHER_WAIT = 0.005  # ... less waits this long for more (followers see it that much later)


class Sink(Protocol):
    async def write(self, offset: int, data: bytes) -> None:
        """Store bytes at `offset`; what it raises is not the source's fault, never retried."""
        ...

    def progressed(self, prefix: int) -> None:
        """Bytes [0, prefix) are all written."""
        ...


@dataclass(frozen=True, slots=True)
class FetchPlan:
    chunk_size: int
    ranged_threshold: int
    ranged_streams: int
    first_request: int = FIRST_REQUEST

    @classmethod
    def of(cls, config: UpstreamConfig) -> FetchPlan:
        return cls(config.chunk_size, config.ranged_threshold, config.ranged_streams)


class RangesIgnored(Exception):
    """A Range request after the first was answered with the whole blob."""


def _first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_cause(first) if isinstance(first, BaseExceptionGroup) else first


def _transient(exc: BaseException, streaming: bool) -> tuple[bool, float | None]:
    """(worth another attempt, the source's Retry-After). A store's failure never is: it is
    not the source's doing, and asking the source again would not cure it.

    Before anything streams (the first request: clients wait for headers), only what fails
    fast is tried again: a refused connection, a 5xx. A silent source, a 429, an open breaker
    or missing credentials are a quick 503 instead, which clients fall back from. Once bytes
    flow, every transient failure is worth riding out: the clients' streams go on."""
    if isinstance(exc, UpstreamError):
        if not streaming:
            return exc.status >= 500, exc.retry_after
        return exc.transient, exc.retry_after
    if isinstance(exc, UpstreamUnavailable):
        return streaming or exc.unreachable, None
    return streaming and isinstance(exc, UpstreamBodyError | TimeoutError), None


class RangedFetch:
    """Fills [0, size) of one blob from `source` into `sink`, reporting the size to `sized`."""

    def __init__(
        self,
        source: RangeSource,
        plan: FetchPlan,
        retry: RetryPolicy,
        sink: Sink,
        sized: Callable[[int], None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._source = source
        self._plan = plan
        self._retry = retry
        self._sink = sink
        self._sized = sized
        self._sleep = sleep
        self._pieces = Pieces(Piece(0, 0, 0), iter(()))
        # One stream left (no Range support, or not a reliable one): an answer with the whole
        # blob is usable, by skipping what is already written.
        self._single = False
        self.size: int | None = None
        self.streams = 0
        self.retries = 0

    async def run(self, start: int = 0) -> None:
        """Fill [start, size): bytes before `start` are there already (an interrupted fill
        of the same blob, which this one goes on from)."""
        plan = self._plan
        first_len = min(plan.chunk_size, plan.first_request)
        try:
            first = await self._attempts(lambda: self._source.open(start, start + first_len - 1))
        except UpstreamError as exc:
            if exc.status != 416:
                raise
            if start:
                # Past the end: what was left is not this blob's start. From byte 0 instead;
                # the digest decides, as always, whether the bytes are right.
                log.info("resume_refused", source=self._source.name, resume_at=start)
                return await self.run(0)
            # An empty blob has no byte 0, so registries answer 416 to the first Range (Go's
            # ServeContent does, S3 too): ask for the whole blob instead.
            first = await self._attempts(lambda: self._source.open())
        self.streams = 1
        if not first.ranged:  # the source ignores Range: one stream
            end = first.total if first.total is not None else UNKNOWN_END
            await self.sequential(start, end, first)
            if self.size is None:
                self._set_size(self._pieces.prefix())
            return
        if first.offset != start or first.total is None:
            first.close()
            raise UpstreamBodyError("the source answered a Range request with an unusable 206")
        total = first.total
        self._set_size(total)
        head = Piece(start, min(start + first_len, total), start)
        rest = plan_pieces(
            total, head.end, plan.chunk_size, plan.ranged_threshold, plan.ranged_streams
        )
        self._pieces = Pieces(head, rest)
        try:
            await self._ranged(head, first)
        except RangesIgnored:
            # Honoured once, ignored later: no later answer can be trusted to be a range.
            resume = self._pieces.prefix()
            log.info("source_ranges_unreliable", source=self._source.name, resume_at=resume)
            await self.sequential(resume, total, None)

    async def sequential(self, start: int, end: int, body: RangeBody | None) -> None:
        """One stream for [start, end) (end UNKNOWN_END: to the body's end), whatever the
        source supports. Also how a disk-full pass-through goes on from the cached prefix."""
        self._single = True
        piece = Piece(start, end, start)
        self._pieces = Pieces(piece, iter(()))
        if self.size is None and end != UNKNOWN_END:
            self._set_size(end)
        await self._fetch_piece(piece, body)

    def retarget(self, sink: Sink) -> None:
        """From now on bytes go to `sink` (the pass-through relay instead of the file)."""
        self._sink = sink

    # -- internals ---------------------------------------------------------------------------

    def _set_size(self, size: int) -> None:
        self.size = size
        self._sized(size)

    async def _attempts(self, open_: Callable[[], Awaitable[RangeBody]]) -> RangeBody:
        failures = 0
        while True:
            try:
                return await open_()
            except Exception as exc:
                await self._after_failure(exc, failures := failures + 1, streaming=False)

    async def _ranged(self, head: Piece, first: RangeBody) -> None:
        """ranged_streams streams in all, the first response's included: each takes the next
        piece when its own is done."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._stream(head, first))
                for _ in range(self._plan.ranged_streams - 1):
                    group.create_task(self._stream(None, None))
        except ExceptionGroup as group:
            if group.subgroup(RangesIgnored) is not None:
                raise RangesIgnored from None
            raise _first_cause(group) from None  # the failure that stopped the others

    async def _stream(self, piece: Piece | None, body: RangeBody | None) -> None:
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

    async def _fetch_piece(self, piece: Piece, body: RangeBody | None) -> None:
        """Fill piece.pos..end, resuming from the last byte written when a stream breaks."""
        failures = 0
        while piece.pos < piece.end:
            try:
                if body is None:
                    end = None if piece.end == UNKNOWN_END else piece.end - 1
                    body = await self._source.open(piece.pos, end)
                if await self._drain(piece, body):
                    failures = 0  # it made progress: a new run of failures starts from here
                if piece.pos < piece.end and piece.end != UNKNOWN_END:
                    raise UpstreamBodyError(f"body ended at byte {piece.pos} of {piece.end}")
                piece.end = piece.pos  # unknown length: the end of the body is the end
            except Exception as exc:
                await self._after_failure(exc, failures := failures + 1, streaming=True)
            finally:
                if body is not None:
                    body.close()  # never reused: a half-read connection is not worth keeping
                    body = None

    async def _drain(self, piece: Piece, body: RangeBody) -> bool:
        """Write this answer's bytes from piece.pos on; True if any landed. Whatever it
        raises, every byte received before is written first: they are good."""
        skip = self._skip(body, piece)
        writes = _PieceWrites(self._sink, piece, self._pieces)
        try:
            async for data in body.chunks():
                if skip:
                    dropped = min(skip, len(data))
                    skip -= dropped
                    data = data[dropped:]
                    if not data:
                        continue
                room = piece.end - writes.received
                if not writes.offer(data if len(data) <= room else data[:room]):
                    await writes.put()  # a write to start, or the disk to catch up with
                if writes.received >= piece.end:
                    break
        finally:
            await writes.drain()
        return writes.landed

    def _skip(self, body: RangeBody, piece: Piece) -> int:
        """How many leading bytes of this answer are before piece.pos (written already)."""
        if body.ranged:
            if body.offset > piece.pos:
                raise UpstreamBodyError("the source answered a Range at the wrong offset")
            return piece.pos - body.offset
        if not self._single:
            raise RangesIgnored
        return piece.pos  # the whole blob again: what was written is skipped, not rewritten

    async def _after_failure(self, exc: Exception, failures: int, streaming: bool) -> None:
        """Returns once it is time for the next attempt; raises `exc` if there is none."""
        transient, retry_after = _transient(exc, streaming)
        if not transient or not self._retry.may_retry(failures):
            raise exc
        self.retries += 1
        await self._sleep(self._retry.delay(failures, retry_after))


class _PieceWrites:
    """One piece's writes: at most one in flight, what arrives meanwhile gathered into the
    next, and a lone chunk held back a moment (GATHER_WAIT) for company, so a stream paced to
    a link's rate costs a write per GATHER bytes, not one per network read. piece.pos moves
    only once bytes are written, so the prefix never runs ahead."""

    def __init__(self, sink: Sink, piece: Piece, pieces: Pieces) -> None:
        self._sink = sink
        self._piece = piece
        self._pieces = pieces
        self._pending = bytearray()
        self._inflight: asyncio.Task[None] | None = None
        self._inflight_len = 0
        self._due: asyncio.TimerHandle | None = None  # the held-back bytes' write
        self._failed = False  # a write failed: nothing more is written for this answer
        self.landed = False

    @property
    def received(self) -> int:
        """Where the next byte from the body belongs."""
        return self._piece.pos + self._inflight_len + len(self._pending)

    def offer(self, data: bytes) -> bool:
        """Take `data`; True when nothing more is to be done for it now (the common case,
        kept free of a coroutine per network read): gathered behind the write in flight."""
        self._pending += data
        if self._inflight is not None and not self._inflight.done():
            return len(self._pending) < BACKLOG
        return self._due is not None and len(self._pending) < GATHER  # held, and waiting

    async def put(self) -> None:
        """After an offer that wants more: start a write, or wait for the disk first."""
        if self._inflight is not None and not self._inflight.done():
            await asyncio.wait([self._inflight])  # the disk is slower than the source
        self._collect()
        if len(self._pending) >= GATHER:
            self._start()
        else:
            self._hold()

    async def drain(self) -> None:
        """Until every byte put is written (or the first write that failed has raised)."""
        self._cancel_hold()
        try:
            while True:
                if self._inflight is not None:
                    await asyncio.wait([self._inflight])
                    self._collect()
                if not self._pending or self._failed:
                    return
                self._start()
        finally:
            self._cancel_hold()
            task = self._inflight
            if task is not None:
                # Cancelled (a sibling stream failed, or shutdown): the write in flight still
                # lands, a moment's disk work, so whoever goes on from the prefix need not
                # fetch those bytes again. What was not handed to it yet is dropped.
                await asyncio.wait([task])
                if not task.cancelled():
                    task.exception()  # we are failing already; this one is not news

    def _hold(self) -> None:
        if self._due is None and self._pending:
            loop = asyncio.get_running_loop()
            self._due = loop.call_later(GATHER_WAIT, self._write_held)

    def _cancel_hold(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None

    def _write_held(self) -> None:
        """The moment is up: write what was held (unless a write is still busy, whose end
        arms this again, or failed, which put or drain will raise)."""
        self._due = None
        task = self._inflight
        if task is not None:
            if not task.done() or task.cancelled() or task.exception() is not None:
                return
            self._inflight = None
            self._inflight_len = 0
        self._start()

    def _collect(self) -> None:
        """The finished write's outcome: raised here if it failed."""
        task = self._inflight
        if task is None or not task.done():
            return
        self._inflight = None
        self._inflight_len = 0
        try:
            task.result()
        except BaseException:
            self._failed = True
            raise

    def _start(self) -> None:
        self._cancel_hold()
        if self._inflight is None and self._pending and not self._failed:
            data, self._pending = bytes(self._pending), bytearray()
            self._inflight_len = len(data)
            self._inflight = asyncio.ensure_future(self._write(self._piece.pos, data))

    async def _write(self, offset: int, data: bytes) -> None:
        await self._sink.write(offset, data)
        # Both at once (no await between): `received` must never count these bytes twice.
        self._piece.pos = offset + len(data)
        self._inflight_len = 0
        self.landed = True
        self._sink.progressed(self._pieces.prefix())
        self._hold()  # what arrived meanwhile must not wait for the next chunk (or a timeout)
