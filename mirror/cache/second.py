"""The region's bucket as the level between the local disk and the origin.

Every call to it goes through its own breaker (separate from the registries'): a bucket that
fails, times out or refuses us is skipped at once for a cooldown, and its trouble never fails
a pull the origin can serve. It remembers which blobs it holds (so a redirect or a HEAD costs
no call) and which held bytes that did not match their digest: those are deleted, skipped,
and fetched from the origin again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import structlog
from cachetools import LRUCache, TTLCache

from mirror.cache.sources import StoreSource
from mirror.coalesce import InFlight
from mirror.config import S3Config
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.storage.blobstore import (
    AlreadyStored,
    BlobStore,
    OpenBlob,
    StoreError,
    StoreUnavailable,
)
from mirror.storage.metastore import ManifestStore
from mirror.upstream.breaker import CircuitBreaker

log = structlog.get_logger("mirror.s3")

T = TypeVar("T")
NAME = "s3"  # the breaker's key, the source's name, the served-bytes label
_KNOWN = 200_000  # digests remembered as held by the bucket
_ABSENT_FOR = 30.0  # seconds a "not in the bucket" answer is believed (another replica uploads)
_CONDEMNED_FOR = 3600.0  # seconds a blob whose copy was wrong is not read from the bucket


class Bucket(BlobStore, ManifestStore, Protocol):
    async def presign(self, digest: Digest, expires: float) -> str: ...


class SecondLevel:
    def __init__(
        self,
        bucket: Bucket,
        breaker: CircuitBreaker,
        config: S3Config,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self.bucket = bucket
        self._breaker = breaker
        self._config = config
        self._metrics = metrics
        self._known: LRUCache[str, int] = LRUCache(_KNOWN)  # hex -> size
        self._absent: TTLCache[str, bool] = TTLCache(_KNOWN, _ABSENT_FOR, timer=clock)
        self._condemned: TTLCache[str, bool] = TTLCache(10_000, _CONDEMNED_FOR, timer=clock)
        self._chores: InFlight[tuple[str, str], SecondLevel] = InFlight("s3 chore")

    @property
    def redirects(self) -> bool:
        return self._config.redirect

    def is_open(self) -> bool:
        return self._breaker.is_open(NAME)

    # -- reads ---------------------------------------------------------------------------

    def source(self, digest: Digest) -> StoreSource | None:
        """The bucket's copy as a source for a fill; None when it is not worth asking."""
        if digest.hex in self._condemned or digest.hex in self._absent:
            return None
        if self._breaker.is_open(NAME):
            return None
        return _BucketSource(self, digest)

    async def has(self, digest: Digest) -> int | None:
        """The size of the bucket's copy, if it has one (remembered, or one HEAD)."""
        if digest.hex in self._condemned or digest.hex in self._absent:
            return None
        try:
            size = await self.guarded(lambda: self.bucket.stat(digest))
        except StoreError:
            return None
        self.seen(digest, size)
        return size

    async def redirect(self, digest: Digest) -> tuple[str, int] | None:
        """(presigned GET, size) for a blob the bucket is known to hold, else None: never for
        one it may not have yet (the client would get a 404 from the bucket)."""
        size = self._known.get(digest.hex)
        if not self._config.redirect or size is None or digest.hex in self._condemned:
            return None
        try:
            url = await self.guarded(
                lambda: self.bucket.presign(digest, self._config.redirect_expiry)
            )
        except StoreError:
            return None
        return url, size

    async def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        if digest.hex in self._condemned or self._breaker.is_open(NAME):
            return None
        try:
            return await self.guarded(lambda: self.bucket.read_manifest(digest))
        except StoreError:
            return None

    # -- writes (background) ---------------------------------------------------------------

    def seen(self, digest: Digest, size: int | None) -> None:
        """What the bucket was found to hold: `size`, or nothing (None)."""
        if size is not None:
            self._known[digest.hex] = size
            self._absent.pop(digest.hex, None)
        else:
            self._known.pop(digest.hex, None)
            self._absent[digest.hex] = True

    def keep_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        if digest.hex in self._known or self._breaker.is_open(NAME):
            return
        self._chore("manifest", digest, lambda: self._put_manifest(digest, body, media_type))

    def condemn(self, digest: Digest) -> None:
        """The bucket's copy did not hash to its digest: never read it again; delete it, so
        the next fill (from the origin) uploads a good one."""
        self._condemned[digest.hex] = True
        self._known.pop(digest.hex, None)
        log.error("s3_object_corrupt", digest=str(digest))
        self._chore("delete", digest, lambda: self._delete(digest))

    async def close(self) -> None:
        await self._chores.close()

    async def guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        """One call through the breaker: its failures open it, any answer closes it."""
        refused = self._breaker.admit(NAME, NAME)
        if refused is not None:
            raise StoreUnavailable(f"S3 is failing; next try in {refused.retry_in:.0f}s")
        try:
            result = await call()
        except StoreUnavailable:
            # No client's request can make the bucket fail: every failure counts (key None).
            self._breaker.failure(NAME, NAME, None)
            raise
        except (StoreError, KeyError):
            self._breaker.success(NAME, NAME)  # it answered (lost a race, or the key is gone)
            raise
        self._breaker.success(NAME, NAME)
        return result

    def _chore(self, what: str, digest: Digest, work: Callable[[], Awaitable[None]]) -> None:
        """Background work on the bucket, one of each kind per digest at a time."""
        key = (what, digest.hex)
        if self._chores.get(key) is None:
            self._chores.start(key, self, _finish(self._chores, key, self, work()))

    async def _put_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        try:
            await self.guarded(lambda: self.bucket.write_manifest(digest, body, media_type))
        except AlreadyStored:
            pass
        except StoreError as exc:
            log.info("s3_manifest_not_kept", digest=str(digest), error=str(exc))
            return
        self.seen(digest, len(body))

    async def _delete(self, digest: Digest) -> None:
        try:
            await self.guarded(lambda: self.bucket.remove(digest))
        except StoreError as exc:
            log.warning("s3_corrupt_object_not_deleted", digest=str(digest), error=str(exc))


async def _finish(
    chores: InFlight[tuple[str, str], SecondLevel],
    key: tuple[str, str],
    owner: SecondLevel,
    work: Awaitable[None],
) -> None:
    try:
        await work
    finally:
        chores.finished(key, owner)


class _BucketSource(StoreSource):
    """The bucket's copy for one fill, looked up through the level's breaker."""

    def __init__(self, level: SecondLevel, digest: Digest) -> None:
        super().__init__(level.bucket, digest, NAME)
        self._level = level

    async def _lookup(self) -> OpenBlob | None:
        blob = await self._level.guarded(lambda: self._level.bucket.open(self._digest))
        self._level.seen(self._digest, None if blob is None else blob.size)
        return blob
