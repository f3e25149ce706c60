"""Size and last access of every cached blob: in memory while running, persisted in SQLite.

The files are the truth; the database only remembers access times across restarts. At start
the tree is scanned and reconciled with it (rows without a file are dropped, files without a
row are added with their mtime), so a lost or corrupt database costs access history, never
consistency. Access times are flushed in batches, never on the request path (how often,
and what a kill -9 may lose: mirror.cache.janitor).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mirror.storage.layout import Layout


@dataclass(frozen=True, slots=True)
class Changes:
    rows: list[tuple[str, int, float]]
    deleted: list[str]


@dataclass(slots=True)
class Entry:
    size: int
    last_access: float


class AccessIndex:
    def __init__(self, layout: Layout, clock: Callable[[], float] = time.time) -> None:
        self._layout = layout
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._pins: Counter[str] = Counter()
        self.total = 0

    # -- the running view --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def add(self, key: str, size: int) -> None:
        old = self._entries.get(key)
        if old is not None:
            self.total -= old.size
        self._entries[key] = Entry(size, self._clock())
        self.total += size
        self._dirty.add(key)
        self._deleted.discard(key)

    def touch(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_access = self._clock()
            self._dirty.add(key)

    def discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.total -= entry.size
            self._dirty.discard(key)
            self._deleted.add(key)

    @contextmanager
    def pinned(self, key: str) -> Iterator[None]:
        """While pinned (being read), a blob is never chosen for eviction."""
        self._pins[key] += 1
        try:
            yield
        finally:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    @property
    def in_use(self) -> frozenset[str]:
        return frozenset(self._pins)

    def rows(self) -> list[tuple[str, int, float]]:
        return [(k, e.size, e.last_access) for k, e in self._entries.items()]

    def oldest_access(self) -> float | None:
        return min((e.last_access for e in self._entries.values()), default=None)

    # -- persistence (blocking: call from a worker thread or the CLI) ------------------------

    def load(self, readonly: bool = False) -> None:
        """Scan the tree and merge in the remembered access times, then write back what the
        scan corrected. `readonly` (`mirror cache status` beside a running server) neither
        writes nor repairs the database: it belongs to the server."""
        remembered: dict[str, float] = {}
        try:
            remembered = self._read_database(readonly)
        except sqlite3.OperationalError:
            pass  # unreadable now (disk full, locked): run on mtimes, keep the file for later
        except sqlite3.DatabaseError:
            if not readonly:
                self._reset_database()  # corrupt: the tree is the truth, history starts again
        self._entries.clear()
        self.total = 0
        for key, size, mtime in self._scan():
            self._entries[key] = Entry(size, remembered.get(key, mtime))
            self.total += size
        stale = set(remembered) - set(self._entries)
        self._deleted |= stale
        self._dirty = {k for k in self._entries if k not in remembered}
        if readonly:
            return
        changes = self.take_changes()
        try:
            self.write(changes)
        except sqlite3.Error:
            self.restore(changes)  # unwritable now (disk full): the next flush tries again

    def flush(self) -> None:
        """Take and write the changes (for single-threaded callers: start-up and the CLI)."""
        self.write(self.take_changes())

    def take_changes(self) -> Changes:
        """Snapshot what changed since the last write. Call on the thread that mutates."""
        rows = [(k, self._entries[k].size, self._entries[k].last_access)
                for k in self._dirty if k in self._entries]  # fmt: skip
        changes = Changes(rows, sorted(self._deleted))
        self._dirty.clear()
        self._deleted.clear()
        return changes

    def write(self, changes: Changes) -> None:
        """Persist a snapshot; safe on a worker thread (touches no shared state)."""
        if not changes.rows and not changes.deleted:
            return
        with self._connect() as db:
            db.executemany(
                "INSERT INTO blobs(key, size, last_access) VALUES (?, ?, ?) ON CONFLICT(key) "
                "DO UPDATE SET size = excluded.size, last_access = excluded.last_access",
                changes.rows,
            )
            db.executemany("DELETE FROM blobs WHERE key = ?", [(k,) for k in changes.deleted])

    def restore(self, changes: Changes) -> None:
        """A write failed: keep its changes for the next one. Call on the mutating thread."""
        self._dirty.update(k for k, _, _ in changes.rows if k in self._entries)
        self._deleted.update(k for k in changes.deleted if k not in self._entries)

    def _scan(self) -> Iterator[tuple[str, int, float]]:
        root = self._layout.blobs / "sha256"
        if not root.is_dir():
            return
        for shard in os.scandir(root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for item in os.scandir(shard.path):
                if len(item.name) == 64 and item.name[:2] == shard.name:
                    st = item.stat(follow_symlinks=False)
                    yield item.name, st.st_size, st.st_mtime

    def _read_database(self, readonly: bool) -> dict[str, float]:
        query = "SELECT key, last_access FROM blobs"
        if not readonly:
            with self._connect() as db:
                return dict(db.execute(query).fetchall())
        uri = f"{(self._layout.root / 'index.sqlite').absolute().as_uri()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            return dict(db.execute(query).fetchall())
        finally:
            db.close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._layout.root / "index.sqlite", timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost last batch loses only access times
            db.execute(
                "CREATE TABLE IF NOT EXISTS blobs "
                "(key TEXT PRIMARY KEY, size INTEGER NOT NULL, last_access REAL NOT NULL)"
            )
            with db:  # one transaction, committed on success
                yield db
        finally:
            db.close()

    def _reset_database(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self._layout.root / 'index.sqlite'}{suffix}")
            except FileNotFoundError:
                pass
