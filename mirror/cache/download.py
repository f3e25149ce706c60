"""One fill of one blob from a source into the local store, followed live by any number of clients.

The download is a task owned by the blob service, never by a request: followers come and go
(hang up, time out) without touching it. It composes the parts: a RangedFetch brings the
bytes, the store writer keeps them, a PrefixHasher verifies them as the prefix grows, and
FillState tells followers how far they may read. No follower is given the last byte of its
response before the whole blob has been verified, so a wrong blob is never a complete success.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from mirror.cache.errors import EXPECTED
from mirror.cache.fill import FillState
from mirror.cache.follow import Follower
from mirror.cache.passthrough import RelaySink
from mirror.cache.prefix_hash import PrefixHasher
from mirror.cache.ranged import FetchPlan, RangedFetch
from mirror.cache.sources import SourceChain
from mirror.cache.transfer import DigestMismatch, DownloadFailed, State
from mirror.oci.digest import Digest
from mirror.storage.blobstore import LocalStore, LocalWriter, NoSpace, PrefixView, StoreError
from mirror.upstream.retry import RetryPolicy

log = structlog.get_logger("mirror.download")


class BlobDownload:
    def __init__(
        self,
        digest: Digest,
        registry: str,
        name: str,
        source: SourceChain,
        store: LocalStore,
        plan: FetchPlan,
        retry: RetryPolicy,
        on_finish: Callable[[BlobDownload], None],
        make_room: Callable[[int], Awaitable[bool]],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.digest = digest
        self.registry = registry  # the repository it was started for (see BlobService)
        self.name = name
        self.source = source
        self._store = store
        self._on_finish = on_finish
        self._make_room = make_room
        self._clock = clock
        self.fill = FillState()  # waking followers is pacing, not policy: real time
        self._fetch = RangedFetch(source, plan, retry, self, self.fill.sized, sleep)
        self._followers: set[Follower] = set()
        self._writer: LocalWriter | None = None
        self._view: PrefixView | None = None  # what followers' views are taken from
        self._hasher: PrefixHasher | None = None
        self._started = asyncio.get_running_loop().create_future()
        self._written = 0
        self.passed_through = False

    # -- for followers -------------------------------------------------------------------------

    async def follow(self) -> Follower | None:
        """A follower, once the fill has a file; None if it ended before (look again: it is
        cached now, or failed); raises DownloadFailed when no file could be made."""
        await asyncio.shield(self._started)
        if self._view is None:
            if self.fill.state is State.FAILED:
                raise self.fill.failure()
            return None
        follower = Follower(self.fill, self._view.copy(), self._followers.discard)
        self._followers.add(follower)
        return follower

    # -- the sink RangedFetch writes into ------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        assert self._writer is not None
        try:
            await self._writer.write(offset, data)
        except NoSpace:
            # The disk is full: evicting may make room; not the source's fault, never retried.
            if not await self._make_room(max(0, (self.fill.size or 0) - self._written)):
                raise
            await self._writer.write(offset, data)
        self._written += len(data)

    def progressed(self, prefix: int) -> None:
        self.fill.grew(prefix)
        if self._hasher is not None:
            self._hasher.advance(prefix)
        if self._writer is not None:
            self._writer.note_prefix(prefix)  # what a fill after a restart may go on from

    # -- the download ------------------------------------------------------------------------

    async def run(self) -> None:
        started = self._clock()
        try:
            try:
                resumed = await self._open()
                try:
                    await self._fetch.run(resumed)
                except NoSpace as exc:
                    await self._pass_through(exc)
                    return
                await self._commit()
                log.info(
                    "blob_committed", digest=str(self.digest), registry=self.registry,
                    source=self.source.name, bytes=self.fill.size, streams=self._fetch.streams,
                    retries=self._fetch.retries, seconds=round(self._clock() - started, 3),
                )  # fmt: skip
            except asyncio.CancelledError:
                self._keep_partial()  # a shutdown, a rolling update: the next fill goes on
                self._finish(State.FAILED, DownloadFailed(RuntimeError("download cancelled")))
                raise
            except EXPECTED as exc:
                if not isinstance(exc, DigestMismatch | StoreError):
                    self._keep_partial()  # an outage: good bytes, for the next fill
                log.warning(
                    "blob_download_failed", digest=str(self.digest), registry=self.registry,
                    source=self.source.name, error=str(exc), error_type=type(exc).__name__,
                    bytes=self.fill.contiguous,
                )  # fmt: skip
                self._finish(State.FAILED, exc)
            except Exception as exc:  # noqa: BLE001 - a bug: said once, loudly; followers fail
                log.exception("blob_download_bug", digest=str(self.digest), source=self.source.name)
                self._finish(State.FAILED, exc)
        finally:
            if self._writer is not None:
                await self._writer.discard()  # nothing once committed; never a partial blob
            if not self._started.done():
                self._started.set_result(None)

    async def _open(self) -> int:
        """The file, its view and hasher; returns where the fill starts (an interrupted fill
        of this digest left that many bytes, to be hashed and checked with the rest)."""
        try:
            self._writer = await self._store.create(digest=self.digest)
            self._view = self._writer.view()
            self._hasher = PrefixHasher(self._view.copy())
        finally:
            if not self._started.done():
                self._started.set_result(None)
        self._hasher.start()
        resumed = self._writer.resumed_at
        if resumed:
            log.info("fill_resumed", digest=str(self.digest), at=resumed)
            self.fill.grew(resumed)  # followers may take them: the last byte waits as always
            self._hasher.advance(resumed)
        return resumed

    def _keep_partial(self) -> None:
        if self._writer is not None and not self.passed_through and self.fill.contiguous:
            self._writer.keep(self.fill.contiguous)

    async def _commit(self) -> None:
        fill, hasher, writer = self.fill, self._hasher, self._writer
        assert fill.size is not None and fill.contiguous == fill.size
        assert hasher is not None and writer is not None
        actual = await hasher.finish(fill.size)
        if actual != self.digest.hex:
            raise DigestMismatch(self.digest, actual)
        # The bytes are proven: followers may finish now; the sync and rename that make the
        # file durable and visible do not concern what they were sent.
        fill.verify()
        try:
            await writer.commit(self.digest)
        except BaseException:
            # Renamed into place before what failed (the directory's sync) or was cancelled
            # (the store lets its thread finish first): the blob is whole, verified, visible.
            if writer.committed:
                self._finish(State.COMMITTED, None)
            raise
        self._finish(State.COMMITTED, None)

    async def _pass_through(self, cause: NoSpace) -> None:
        """No room for the file: finish the followers we have from memory instead. The
        download leaves the service at once, so the next request tries caching again."""
        assert self._hasher is not None
        self.passed_through = True
        self._on_finish(self)
        fill = self.fill
        log.warning(
            "cache_full_passthrough", digest=str(self.digest), registry=self.registry,
            cached_prefix=fill.contiguous, readers=len(self._followers), error=str(cause),
        )  # fmt: skip
        start = fill.contiguous
        await self._hasher.finish(start)  # the relay goes on hashing inline from here
        for follower in self._followers:
            follower.relay_from(start)
        fill.wake_all()
        if fill.size is None:
            raise cause  # a size-less stream cannot be followed past the file; rare enough
        relays = lambda: [f.relay for f in self._followers if f.relay is not None]  # noqa: E731
        self._fetch.retarget(RelaySink(self._hasher, relays))
        await self._fetch.sequential(start, fill.size, None)
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(self.digest, actual)
        fill.verify()
        self._finish(State.PASSED, None)

    def _finish(self, state: State, error: BaseException | None) -> None:
        if not self.fill.finish(state, error):
            return
        if self._hasher is not None:
            self._hasher.cancel()
        if not self.passed_through:
            self._on_finish(self)  # synchronously: no follower may join a finished fill
        if self._view is not None:
            self._view.close()
            self._view = None
        self.fill.close()
        for follower in self._followers:
            if follower.relay is not None:
                follower.relay.end()
