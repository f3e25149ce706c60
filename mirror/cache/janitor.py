"""Keeps the cache within its size cap: access tracking, LRU eviction, index persistence.

Access times live in memory and reach index.sqlite in batches, every FLUSH_INTERVAL seconds
and at a clean stop, never on the request path. A kill -9 therefore loses at most the last
FLUSH_INTERVAL of access history: a blob used only in those seconds looks as old as its
previous use after the restart and may be evicted early. Nothing else is lost: the tree is the
truth and the index is reconciled with it at start (see mirror.storage.index).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable

import structlog

from mirror.config import CacheConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.storage.blobstore import BlobStore
from mirror.storage.eviction import choose_victims, eviction_target
from mirror.storage.index import AccessIndex

log = structlog.get_logger("mirror.janitor")


_SLACK = 1 << 20  # free space that filesystem metadata for the rest of a blob may take
FLUSH_INTERVAL = 10.0  # seconds between index writes: the access history a kill -9 may lose


class CacheJanitor:
    def __init__(
        self,
        store: BlobStore,
        index: AccessIndex,
        config: CacheConfig,
        metrics: Metrics,
        free_space: Callable[[], int],
        interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._store = store
        self._free_space = free_space  # blocking: bytes free on the cache's filesystem
        self._index = index
        self._config = config
        self._metrics = metrics
        self._room_lock = asyncio.Lock()  # one make_room at a time: see make_room
        self._interval = interval
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._evicted: list[Callable[[Digest], None]] = []
        # Stored since the cache went over its cap and no automatic round has run since: the
        # blobs just committed, which that round must not evict (see collect).
        self._fresh: set[str] = set()
        self._fresh_weighed = False

    async def start(self) -> None:
        await asyncio.to_thread(self._index.load)
        self._gauges()
        log.info("cache_loaded", entries=len(self._index), bytes=self._index.total)
        self._task = asyncio.create_task(self._loop(), name="cache janitor")

    async def close(self) -> None:
        """Let a round in progress finish, then write what is left. Cancelling the round could
        leave its save running in a thread, landing after this one with older access times."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._save_index()

    async def _save_index(self) -> None:
        changes = self._index.take_changes()  # on the loop: the only thread that mutates it
        try:
            await asyncio.to_thread(self._index.write, changes)
        except sqlite3.Error as exc:  # a full disk must not turn a clean stop into a crash
            self._index.restore(changes)
            log.warning("index_not_saved", error=str(exc))

    # -- what the services report ------------------------------------------------------------

    def stored(self, digest: Digest, size: int) -> None:
        cfg = self._config
        if self._fresh_weighed or not self._over_cap():
            # A round has weighed the earlier ones, or they fit: ordinary entries from now on.
            self._fresh.clear()
            self._fresh_weighed = False
        self._fresh.add(digest.hex)
        self._index.add(digest.hex, size)
        self._gauges()
        if cfg.max_size and size > cfg.max_size * cfg.high_watermark:
            log.warning(
                "blob_exceeds_cache_cap", digest=str(digest), bytes=size, cap=cfg.max_size,
                high_watermark=cfg.high_watermark,
            )  # fmt: skip
        if self._over_cap():
            self._wake.set()

    def _over_cap(self) -> bool:
        cfg = self._config
        total = self._index.total
        return (
            eviction_target(total, cfg.max_size, cfg.high_watermark, cfg.low_watermark) is not None
        )

    def accessed(self, digest: Digest) -> None:
        """Never adds: a copy served from memory, or a file read a moment before its eviction,
        must not bring back an entry whose file is gone. Only `stored` adds, after a write."""
        self._index.touch(digest.hex)

    def missing(self, digest: Digest) -> None:
        """A blob the index knew is gone from disk (deleted by hand, say: `mirror cache gc`
        refuses to run beside a server)."""
        if digest.hex in self._index:
            self._index.discard(digest.hex)
            self._gauges()

    def pinned(self, digest: Digest) -> contextlib.AbstractContextManager[None]:
        return self._index.pinned(digest.hex)

    def on_evicted(self, listener: Callable[[Digest], None]) -> None:
        """Told of every file the janitor deletes, once it is gone: a service that keeps copies in
        memory drops them, so the next request fetches and stores the content again."""
        self._evicted.append(listener)

    # -- eviction ----------------------------------------------------------------------------

    async def collect(self, target: int | None = None) -> tuple[int, int]:
        """Evict least recently used blobs down to `target` bytes. Returns (blobs, bytes) deleted.

        Without a target this is the automatic round: above the high watermark, down to the low
        one, never evicting the blobs just stored (those since the last round that took the
        cache over its cap). One too big for the low watermark then evicts only what the cap
        needs, and one too big for the cap evicts nothing: it goes later, in its turn as least
        recently used."""
        async with self._lock:
            keep: frozenset[str] = self._index.in_use
            ceiling = None
            if target is None:
                cfg = self._config
                self._fresh_weighed = True
                target = eviction_target(
                    self._index.total, cfg.max_size, cfg.high_watermark, cfg.low_watermark
                )
                if target is None:
                    return 0, 0
                keep |= self._fresh
                ceiling = int(cfg.max_size * cfg.high_watermark)
            victims = choose_victims(self._index.rows(), self._index.total, target, keep, ceiling)
            deleted = freed = 0
            for key, _ in victims:
                if key in self._index.in_use:
                    continue  # pinned since the choice was made (a request just opened it)
                self._index.discard(key)
                digest = Digest("sha256", key)
                size = await self._store.remove(digest)
                for listener in self._evicted:
                    listener(digest)
                if size is not None:
                    deleted += 1
                    freed += size
            if victims:
                self._metrics.evictions.inc(deleted)
                self._metrics.evicted_bytes.inc(freed)
                self._gauges()
                log.info("cache_evicted", blobs=deleted, bytes=freed, total=self._index.total)
            return deleted, freed

    async def make_room(self, needed: int) -> bool:
        """The disk is full mid-write: free at least `needed` bytes if evicting can get there.

        A blob that would not fit even in an empty cache evicts nothing: emptying the cache for
        a fill that then passes through anyway would only cost the next pulls.

        Writers that hit the full disk together (the ranged streams of one download, or several
        downloads) take turns, and each looks at the free space again first: the one before it
        may already have made the room, and evicting twice would only cost the next pulls."""
        async with self._room_lock:
            free = await asyncio.to_thread(self._free_space)
            if free >= needed + _SLACK:
                return True
            if needed > free + self._index.total:
                return False
            _, freed = await self.collect(max(0, self._index.total - max(needed, 64 << 20)))
            return freed > 0

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.collect()
                await self._save_index()
            except Exception:  # noqa: BLE001 - the janitor must outlive one bad round
                log.exception("janitor_failed")

    def _gauges(self) -> None:
        self._metrics.cache_bytes.set(self._index.total)
        self._metrics.cache_entries.set(len(self._index))
