"""The state of one blob fill that its followers look at: size, written prefix, verdict, outcome.

No I/O: the download reports what happened (sized, grew, verified, finished) and followers
wait for what they need. This is the whole of what a follower may know about a download.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mirror.cache.transfer import UNKNOWN_END, DownloadFailed, State
from mirror.cache.waiters import PrefixWaiters


class FillState:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.size: int | None = None
        self.contiguous = 0  # bytes [0, contiguous) are written
        # The whole blob hashed to its digest: followers may send their last byte. Set before
        # the commit (or at the end of a pass-through), so it is the one thing they check.
        self.verified = False
        self.state = State.RUNNING
        self.error: BaseException | None = None
        self._sized = asyncio.Event()
        self._done = asyncio.get_running_loop().create_future()
        self._waiters = PrefixWaiters(clock)

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    # -- what the download reports -------------------------------------------------------------

    def sized(self, size: int) -> None:
        self.size = size
        self._sized.set()

    def grew(self, prefix: int) -> None:
        if prefix > self.contiguous:
            self.contiguous = prefix
            self._waiters.grew(prefix)

    def verify(self) -> None:
        self.verified = True
        self._waiters.wake_all()

    def wake_all(self) -> None:
        """Followers re-read the state (their source of bytes changed: a pass-through)."""
        self._waiters.wake_all()

    def finish(self, state: State, error: BaseException | None) -> bool:
        """The outcome, once; False when it was already decided."""
        if self.state is not State.RUNNING:
            return False
        self.state = state
        self.error = error
        self._sized.set()
        if not self._done.done():
            self._done.set_result(None)
        self._waiters.wake_all()
        return True

    # -- what followers wait for -----------------------------------------------------------------

    def failure(self) -> DownloadFailed:
        assert self.error is not None, "only a failed fill has a failure"
        return DownloadFailed(self.error)

    async def wait_sized(self) -> int:
        """The size as soon as the source said it; raises DownloadFailed if it failed first."""
        await self._sized.wait()
        if self.size is None:
            raise self.failure()
        return self.size

    async def wait_done(self) -> None:
        """Until committed (returns) or not (raises DownloadFailed)."""
        await asyncio.shield(self._done)
        if self.state is State.PASSED:
            raise DownloadFailed(RuntimeError("the cache disk is full: served, not cached"))
        if self.state is State.FAILED:
            raise self.failure()

    async def wait_beyond(self, pos: int, needed: int) -> None:
        """Until the prefix reaches `needed`, a tick passes with progress past `pos`, the blob
        is verified, or the fill ends."""
        if not self.running or self.verified or self.contiguous >= needed:
            return
        await self._waiters.wait(pos, needed)

    async def wait_verdict(self) -> None:
        """Until the blob is verified or the fill ends; new bytes alone wake nobody."""
        while not (self.verified or not self.running):
            await self._waiters.wait(UNKNOWN_END, UNKNOWN_END)

    def close(self) -> None:
        self._waiters.close()
