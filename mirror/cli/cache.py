"""`mirror cache status|gc`: the cache directory seen and trimmed from the command line."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from typing import TextIO

from mirror.cache.janitor import FLUSH_INTERVAL, CacheJanitor
from mirror.config import CacheConfig
from mirror.config.values import format_size, parse_size
from mirror.metrics import Metrics
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import AccessIndex
from mirror.storage.layout import Layout
from mirror.storage.lock import CacheInUse, CacheLock, in_use


def run_cache(
    config: CacheConfig, command: str, target: str | None, out: TextIO = sys.stdout
) -> int:
    store = FilesystemStore(Layout(config.directory))
    if not store.layout.blobs.is_dir():
        print(f"no cache at {config.directory}", file=sys.stderr)
        return 1
    if command == "status":
        return _status(config, store, out)
    try:
        goal = parse_size(target) if target else int(config.max_size * config.low_watermark)
    except ValueError as exc:
        print(f"mirror cache gc: --target: {exc}", file=sys.stderr)
        return 2
    if not target and not config.max_size:
        print("mirror cache gc: no cache.max_size configured; pass --target", file=sys.stderr)
        return 2
    try:
        # Held while deleting: a server starting meanwhile refuses rather than serving blobs
        # that are about to go.
        with CacheLock(store.layout):
            return _gc(config, store, goal, out)
    except CacheInUse as exc:
        print(
            f"mirror cache gc: {exc} (a running mirror server). The server evicts by its own "
            "watermarks: to keep the cache smaller, lower cache.max_size (MIRROR_CACHE_MAX_SIZE) "
            "and restart it, or stop it and run gc then.",
            file=sys.stderr,
        )
        return 1


def _status(config: CacheConfig, store: FilesystemStore, out: TextIO) -> int:
    server = in_use(store.layout)
    index = AccessIndex(store.layout)
    # Scans the tree, so sizes are right however old the server's last flush; read-only, as
    # the index belongs to the server when one runs.
    index.load(readonly=True)
    oldest = index.oldest_access()
    cap = format_size(config.max_size) if config.max_size else "unbounded"
    print(f"directory     {config.directory}", file=out)
    print(f"size          {format_size(index.total)} ({index.total} bytes), cap {cap}", file=out)
    print(f"entries       {len(index)}", file=out)
    when = "-" if oldest is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(oldest))
    print(f"oldest access {when}{'' if oldest is None else ' UTC'}", file=out)
    if server is not None:
        pid = "" if server.pid is None else f" (pid {server.pid})"
        print(
            f"server        running{pid}: access times may lag by up to {FLUSH_INTERVAL:g} s",
            file=out,
        )
    return 0


def _gc(config: CacheConfig, store: FilesystemStore, goal: int, out: TextIO) -> int:
    """The server's own eviction (CacheJanitor.collect), run once without a server."""
    index = AccessIndex(store.layout)

    async def collect() -> tuple[int, int]:
        janitor = CacheJanitor(
            store, index, config, Metrics(), lambda: shutil.disk_usage(store.layout.root).free
        )
        await janitor.start()
        try:
            return await janitor.collect(goal)
        finally:
            await janitor.close()

    evicted, freed = asyncio.run(collect())
    print(
        f"evicted {evicted} blobs, {format_size(freed)}; now {format_size(index.total)}",
        file=out,
    )
    return 0
