"""Readers waiting on a growing prefix, and when each of them is woken."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mirror.cache.transfer import WAKE_INTERVAL


@dataclass(slots=True)
class _Waiter:
    pos: int
    needed: int
    future: asyncio.Future[None]


class PrefixWaiters:
    """Readers that follow a prefix as it grows.

    A reader is woken once the prefix reaches what it asked for (a batch), or at the next tick
    if any byte landed for it meanwhile: slow links still trickle promptly, and a fast download
    does not wake every reader for every upstream write. A wake put off inside a tick is owed,
    and a timer pays it at the tick's end: the next upstream write may be a read timeout away,
    and bytes that landed must not wait for it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._waiters: list[_Waiter] = []
        self._prefix = 0
        self._last_tick = -math.inf
        self._owed: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def wait(self, pos: int, needed: int) -> None:
        """Until the prefix reaches `needed`, a tick passes with it beyond `pos`, or wake_all."""
        future = asyncio.get_running_loop().create_future()
        waiter = _Waiter(pos, needed, future)
        self._waiters.append(waiter)
        try:
            await future
        finally:
            # Woken ones were taken off the list already; a cancelled one was not, and would
            # be scanned on every write for the rest of the download.
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def grew(self, prefix: int) -> None:
        self._prefix = prefix
        now = self._clock()
        tick = now - self._last_tick >= WAKE_INTERVAL
        if tick:
            self._last_tick = now
        keep = []
        owed = False
        for w in self._waiters:
            if prefix >= w.needed or (tick and prefix > w.pos):
                if not w.future.done():
                    w.future.set_result(None)
            else:
                keep.append(w)
                owed = owed or prefix > w.pos
        self._waiters = keep
        if owed and self._owed is None:
            delay = max(0.0, self._last_tick + WAKE_INTERVAL - now)
            self._owed = asyncio.get_running_loop().call_later(delay, self._pay)

    def wake_all(self) -> None:
        self.close()
        for w in self._waiters:
            if not w.future.done():
                w.future.set_result(None)
        self._waiters = []

    def close(self) -> None:
        if self._owed is not None:
            self._owed.cancel()
            self._owed = None

    def _pay(self) -> None:
        self._owed = None
        self._last_tick = -math.inf  # the timer and the clock may disagree by a hair
        self.grew(self._prefix)
