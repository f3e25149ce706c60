"""Cache pieces on their own: what a clean stop writes to the index (with an injected clock),
and the lock that keeps a cache directory to one server."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mirror.cache.janitor import CacheJanitor
from mirror.config import CacheConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import AccessIndex, Changes
from mirror.storage.layout import Layout
from mirror.storage.lock import CacheInUse, CacheLock, in_use

HEX = "ab" * 32
DIGEST = Digest("sha256", HEX)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class GatedIndex(AccessIndex):
    """Once armed, its first write waits for the test: a periodic save caught in progress at
    shutdown (the write at start-up, from `load`, goes through)."""

    def __init__(self, root: Path, clock: Clock) -> None:
        super().__init__(Layout(root), clock)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.first_done = threading.Event()
        self.armed = False
        self.writes = 0

    def write(self, changes: Changes) -> None:
        if not self.armed:
            super().write(changes)
            return
        self.writes += 1
        if self.writes > 1:
            super().write(changes)
            self.gate.set()  # a write that overtook the first: let that one land after it
            return
        self.entered.set()
        self.gate.wait(10)
        super().write(changes)
        self.first_done.set()


def remembered(root: Path) -> float:
    with sqlite3.connect(root / "index.sqlite") as db:
        (value,) = db.execute("SELECT last_access FROM blobs WHERE key = ?", (HEX,)).fetchone()
    return float(value)


async def test_a_clean_stop_writes_the_last_access_times(tmp_path: Path) -> None:
    """Access times are written every few seconds and at a clean stop. A stop that caught a
    save in progress cancelled it and wrote its own, and the cancelled one, still running in
    its thread, could land last and put back the older times."""
    root = tmp_path / "cache"
    FilesystemStore(Layout(root)).prepare()
    clock = Clock()
    index = GatedIndex(root, clock)
    # A cap of one byte: the blob stored next wakes the janitor for a round (and a save).
    store = FilesystemStore(Layout(root))
    janitor = CacheJanitor(store, index, CacheConfig(root, max_size=1), Metrics(), lambda: 1 << 40)
    await janitor.start()
    index.armed = True
    janitor.stored(DIGEST, 10)
    await asyncio.to_thread(index.entered.wait, 10)  # the round's save has begun
    clock.now = 2000.0
    janitor.accessed(DIGEST)

    closing = asyncio.create_task(janitor.close())
    # A stop that does not wait for the save writes its own meanwhile (and that write opens the
    # gate); one that waits is still waiting when the bound runs out, and the test opens it.
    await asyncio.to_thread(index.gate.wait, 0.5)
    index.gate.set()
    await closing
    await asyncio.to_thread(index.first_done.wait, 10)
    assert remembered(root) == 2000.0


def test_one_holder_per_cache_directory(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "cache")
    assert in_use(layout) is None
    with CacheLock(layout):
        with pytest.raises(CacheInUse, match=f"in use by process {os.getpid()}") as refused:
            CacheLock(layout).acquire()  # a second server, even in this process
        assert refused.value.pid == os.getpid()
        held = in_use(layout)
        assert held is not None and held.pid == os.getpid()
    assert in_use(layout) is None
    with CacheLock(layout):  # released: free for the next one
        pass


HOLD = """
import sys
from pathlib import Path
from mirror.storage.layout import Layout
from mirror.storage.lock import CacheLock
CacheLock(Layout(Path(sys.argv[1]))).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """kill -9 must never leave a cache that no server can open again: the kernel drops the
    lock with the process, whatever the file says."""
    layout = Layout(tmp_path / "cache")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(layout.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        held = in_use(layout)
        assert held is not None and held.pid == proc.pid
        with pytest.raises(CacheInUse):
            CacheLock(layout).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert layout.lock.exists()
    assert in_use(layout) is None
    with CacheLock(layout):
        pass
