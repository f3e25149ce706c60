"""One server per cache directory: an exclusive advisory lock held for the server's lifetime.

Two servers on one directory would each sweep the other's temp files at start and evict by
their own view of the index; `mirror cache gc` beside a server would delete blobs it is sending
and leave its size gauges wrong. Both take this lock and refuse when it is held. The kernel
drops it with the process, so a kill -9 never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from types import TracebackType

from mirror.storage.layout import Layout

_ATTEMPTS = 5
_PAUSE = 0.02  # seconds: far longer than `in_use` holds it, far shorter than a refused start


class CacheInUse(Exception):
    """Another process holds the cache directory."""

    def __init__(self, layout: Layout, pid: int | None) -> None:
        self.directory = layout.root
        self.pid = pid
        holder = "another process" if pid is None else f"process {pid}"
        super().__init__(f"cache directory {layout.root} is in use by {holder}")


class CacheLock:
    """`with CacheLock(layout):` holds the directory, or raises CacheInUse naming the holder."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._fd: int | None = None

    def acquire(self) -> None:
        self._layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # `in_use` (mirror cache status) holds the lock shared for an instant: a start that
            # meets it tries again rather than failing on a read-only look.
            for attempt in range(_ATTEMPTS):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == _ATTEMPTS - 1:
                        raise
                    time.sleep(_PAUSE)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise CacheInUse(self._layout, pid) from None
        except BaseException:
            os.close(fd)
            raise
        # For the messages of whoever is refused; the lock, not this number, is what counts.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def in_use(layout: Layout) -> CacheInUse | None:
    """Who holds the directory, if anyone. Takes the lock only shared and only for a moment, so
    it is safe beside a running server (for read-only commands like `mirror cache status`)."""
    try:
        fd = os.open(layout.lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return CacheInUse(layout, _read_pid(fd))
    finally:
        os.close(fd)
    return None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
