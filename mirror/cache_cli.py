"""`mirror cache status|gc`: the cache directory seen and trimmed from the command line."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mirror.config import CacheConfig, format_size, parse_size
from mirror.oci.digest import Digest
from mirror.storage.eviction import choose_victims
from mirror.storage.index import AccessIndex
from mirror.storage.store import FilesystemStore


def run_cache(
    config: CacheConfig, command: str, target: str | None, out: TextIO = sys.stdout
) -> int:
    store = FilesystemStore(config.directory)
    if not store.layout.blobs.is_dir():
        print(f"no cache at {config.directory}", file=sys.stderr)
        return 1
    index = AccessIndex(store.layout)
    index.load()  # scans the tree: right even if the server's last flush is a few seconds old
    if command == "status":
        oldest = index.oldest_access()
        cap = format_size(config.max_size) if config.max_size else "unbounded"
        print(f"directory     {config.directory}", file=out)
        print(
            f"size          {format_size(index.total)} ({index.total} bytes), cap {cap}", file=out
        )
        print(f"entries       {len(index)}", file=out)
        when = "-" if oldest is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(oldest))
        print(f"oldest access {when}{'' if oldest is None else ' UTC'}", file=out)
        return 0
    try:
        goal = parse_size(target) if target else int(config.max_size * config.low_watermark)
    except ValueError as exc:
        print(f"mirror cache gc: --target: {exc}", file=sys.stderr)
        return 2
    if not target and not config.max_size:
        print("mirror cache gc: no cache.max_size configured; pass --target", file=sys.stderr)
        return 2
    victims = choose_victims(index.rows(), index.total, goal, frozenset())
    freed = 0
    for key, _ in victims:
        freed += store.remove_blob(Digest("sha256", key))
        index.discard(key)
    index.flush()
    print(
        f"evicted {len(victims)} blobs, {format_size(freed)}; now {format_size(index.total)}",
        file=out,
    )
    return 0
