"""Blobs: served from disk when cached, else from the one shared fill of them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from cachetools import LRUCache

from mirror.cache.body import BlobBody, CachedBody, LiveBody, Redirect
from mirror.cache.download import BlobDownload
from mirror.cache.errors import EXPECTED, to_registry_error
from mirror.cache.janitor import CacheJanitor
from mirror.cache.ranged import FetchPlan
from mirror.cache.second import NAME, SecondLevel
from mirror.cache.sources import SourceChain
from mirror.cache.transfer import DigestMismatch, DownloadFailed, State
from mirror.cache.uploads import Uploader
from mirror.coalesce import InFlight, SingleFlight
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.storage.blobstore import LocalStore
from mirror.upstream.errors import UpstreamError
from mirror.upstream.peer import NAME as PEER
from mirror.upstream.peer import Peers
from mirror.upstream.retry import RetryPolicy
from mirror.upstream.source import RangeSource

# One stream for the whole blob (a peer's fill: in-region, and only its last byte held back).
WHOLE = FetchPlan(1 << 62, 1 << 62, 1, first_request=1 << 62)


class BlobOrigin(Protocol):
    """Where a blob comes from when no level has it: the registry."""

    def source(self, registry: str, repository: str, digest: Digest) -> RangeSource: ...

    async def size(self, registry: str, repository: str, digest: Digest) -> int: ...


class BlobService:
    def __init__(
        self,
        store: LocalStore,
        origin: BlobOrigin,
        plan: FetchPlan,
        retry: RetryPolicy,
        metrics: Metrics,
        janitor: CacheJanitor,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        second: SecondLevel | None = None,
        uploads: Uploader | None = None,
        peers: Peers | None = None,
    ) -> None:
        """`second`: the region's bucket, asked before the origin; `uploads`: what copies
        blobs fetched from elsewhere into it; `peers`: the other replicas, a digest's owner
        asked first."""
        self._store = store
        self._peers = peers
        self._second = second
        self._uploads = uploads
        self._origin = origin
        self._plan = plan
        self._retry = retry
        self._metrics = metrics
        self._janitor = janitor
        self._clock = clock
        self._sleep = sleep
        self._downloads: InFlight[str, BlobDownload] = InFlight("download")
        # Upstream HEADs, by repository too: one that lacks the blob must not answer for one
        # that has it.
        self._heads: SingleFlight[tuple[str, str, str], int] = SingleFlight("blob head")
        # What those HEADs said: a digest's size never changes, so a repeated HEAD of a blob
        # not cached yet costs the origin nothing more (per repository, as above).
        self._sizes: LRUCache[tuple[str, str, str], int] = LRUCache(10_000)

    @property
    def in_flight(self) -> int:
        return len(self._downloads)

    async def cached_size(self, digest: Digest) -> int | None:
        size = await self._store.stat(digest)
        if size is None:
            self._janitor.missing(digest)
        else:
            self._janitor.accessed(digest)
        return size

    async def _cached(self, digest: Digest) -> CachedBody | None:
        blob = await self._store.open(digest)
        if blob is None:
            self._janitor.missing(digest)
            return None
        self._janitor.accessed(digest)
        return CachedBody(blob, self._janitor.pinned(digest))

    async def open(
        self,
        registry: str,
        name: str,
        digest: Digest,
        rejoin: bool = True,
        for_peer: bool = False,
    ) -> BlobBody | Redirect:
        """The body of a blob: from disk, or following its fill (started if need be); or,
        with redirects on, a presigned URL of the bucket's copy when it is known to be there.

        Fills are shared by digest across repositories (a base layer is one download for
        every image built on it). One started for a repository that lacks the blob, or that
        the mirror may not read, fails for that reason only: a caller that joined it from
        another repository then tries once with its own.

        `for_peer`: asked by another replica, which never gets a redirect, and is never
        served from a fill that itself reads from a peer (two replicas that each think the
        other owns a digest would wait for each other): it gets a quick 503 and moves on."""
        if self._second is not None and self._second.redirects and not for_peer:
            found = await self._second.redirect(digest)
            if found is not None:
                self._janitor.accessed(digest)
                return Redirect(*found)
        for _ in range(3):  # a fill that ends as we join is cached now: look again
            try:
                hit = await self._cached(digest)
                if hit is not None:
                    return hit
                download, result = self._download(registry, name, digest, for_peer)
                follower = await download.follow()
            except DownloadFailed as exc:
                raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
            except OSError as exc:  # no descriptor to be had (EMFILE), a vanished volume
                raise RegistryError(
                    ErrorCode.UNAVAILABLE, f"cache storage unavailable: {exc.strerror}"
                ) from exc
            if follower is None:
                continue
            try:
                size = await download.fill.wait_sized()
            except DownloadFailed as exc:
                follower.close()
                if rejoin and _theirs_alone(download, registry, name, exc):
                    return await self.open(registry, name, digest, False, for_peer)
                raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
            except BaseException:
                follower.close()
                raise
            return LiveBody(follower, size, result, download.source.current)
        raise RegistryError(ErrorCode.UNAVAILABLE, "the blob's fill kept ending; try again")

    async def size(self, registry: str, name: str, digest: Digest) -> tuple[int, str]:
        """For HEAD: never starts a download of a whole blob just to learn its size."""
        size = await self.cached_size(digest)
        if size is not None:
            return size, "hit"
        download = self._downloads.get(digest.hex)
        try:
            if download is not None:
                try:
                    return await download.fill.wait_sized(), "coalesced"
                except DownloadFailed as exc:
                    if not _theirs_alone(download, registry, name, exc):
                        raise
            if self._second is not None:
                size = await self._second.has(digest)
                if size is not None:
                    return size, "hit"
            key = (registry, name, digest.hex)
            known = self._sizes.get(key)
            if known is not None:
                return known, "coalesced"
            size, shared = await self._heads.do(key, lambda: self._head(key, digest))
        except EXPECTED as exc:  # translated for the client; anything else is a bug
            raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
        return size, "coalesced" if shared else "miss"

    async def _head(self, key: tuple[str, str, str], digest: Digest) -> int:
        """The origin's HEAD, remembered before the flight ends: a HEAD arriving as it ends
        finds the size, not an empty flight."""
        size = await self._origin.size(key[0], key[1], digest)
        self._sizes[key] = size
        return size

    async def fetch(self, registry: str, name: str, digest: Digest) -> str:
        """Make sure a blob is cached (for warming); returns hit, miss or coalesced."""
        if await self.cached_size(digest) is not None:
            return "hit"
        download, result = self._download(registry, name, digest)
        try:
            await download.fill.wait_done()
        except DownloadFailed as exc:
            if not _theirs_alone(download, registry, name, exc):
                raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
            download, result = self._download(registry, name, digest)
            try:
                await download.fill.wait_done()
            except DownloadFailed as again:
                raise to_registry_error(again, ErrorCode.BLOB_UNKNOWN) from again
        return result

    def progress(self, digest: Digest) -> tuple[int, int | None] | None:
        """(bytes so far, size) of a download in flight, for job status."""
        download = self._downloads.get(digest.hex)
        return (download.fill.contiguous, download.fill.size) if download else None

    def _download(
        self, registry: str, name: str, digest: Digest, for_peer: bool = False
    ) -> tuple[BlobDownload, str]:
        download = self._downloads.get(digest.hex)
        if download is not None:  # a finished one is gone already: _finished runs synchronously
            if for_peer and download.source.name == PEER:
                raise RegistryError(
                    ErrorCode.UNAVAILABLE, "this replica is fetching it from a peer itself"
                )
            return download, "coalesced"
        sources = self._sources(registry, name, digest, for_peer)
        # From a peer, one open-ended stream: the owner sends what has landed as it lands.
        plan = WHOLE if sources.name == PEER else self._plan
        download = BlobDownload(
            digest, registry, name, sources, self._store, plan, self._retry, self._finished,
            self._janitor.make_room, self._clock, self._sleep,
        )  # fmt: skip
        self._downloads.start(digest.hex, download, download.run())
        self._metrics.downloads_in_flight.inc()
        return download, "miss"

    def _sources(
        self, registry: str, name: str, digest: Digest, for_peer: bool = False
    ) -> SourceChain:
        """Region first: the digest's owner (unless this replica is it, or a peer asks), the
        bucket's copy when there may be one, then the origin."""
        sources: list[RangeSource] = []
        if self._peers is not None and not for_peer:
            sources.extend(self._peers.sources(registry, name, digest))
        if self._second is not None:
            bucket = self._second.source(digest)
            if bucket is not None:
                sources.append(bucket)
        sources.append(self._origin.source(registry, name, digest))
        return SourceChain(sources)

    def _finished(self, download: BlobDownload) -> None:
        if self._downloads.finished(download.digest.hex, download):
            self._metrics.downloads_in_flight.dec()
        fill, digest = download.fill, download.digest
        from_bucket = NAME in download.source.used
        if fill.state is State.COMMITTED and fill.size is not None:
            self._janitor.stored(digest, fill.size)
            if self._second is not None:
                used = download.source.used
                if from_bucket and used == {NAME}:
                    self._second.seen(digest, fill.size)
                elif used != {PEER} and self._uploads is not None:
                    # The region's copy, for later (a fill from the owner: the owner's job).
                    self._uploads.enqueue(digest, fill.size)
        if download.passed_through and fill.state is State.RUNNING:
            self._metrics.cache_write_failures.labels("enospc").inc()
        if isinstance(fill.error, DigestMismatch):
            self._metrics.digest_mismatches.labels(download.registry).inc()
            if from_bucket and self._second is not None:
                self._second.condemn(digest)

    async def close(self) -> None:
        """Shutdown: cancel downloads; each discards its temp file, so nothing partial remains."""
        await self._downloads.close()
        await self._heads.close()


def _theirs_alone(download: BlobDownload, registry: str, name: str, exc: DownloadFailed) -> bool:
    """A failure that may concern only the repository the download was started for: it lacks
    the blob, or the mirror may not read it. Anything else (an outage, a full disk, wrong
    bytes) would fail this repository's own try the same way, so it is not worth one."""
    cause = exc.cause
    return (
        (download.registry, download.name) != (registry, name)
        and isinstance(cause, UpstreamError)
        and cause.status in (401, 403, 404)
    )
