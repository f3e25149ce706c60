"""Readers waiting on a growing prefix: who is woken, and who stays on the list."""

from __future__ import annotations

import asyncio

from mirror.cache.waiters import PrefixWaiters


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_cancelled_reader_leaves_the_list() -> None:
    """A client that hangs up cancels its wait: it must not be scanned on every later write."""
    waiters = PrefixWaiters(Clock())
    tasks = [asyncio.ensure_future(waiters.wait(0, 1000)) for _ in range(50)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert waiters.waiting == 0


async def test_a_reader_is_woken_by_its_batch_or_by_the_next_tick() -> None:
    clock = Clock()
    waiters = PrefixWaiters(clock)
    batch = asyncio.ensure_future(waiters.wait(0, 1000))
    trickle = asyncio.ensure_future(waiters.wait(0, 5000))
    await asyncio.sleep(0)
    waiters.grew(1000)  # the first tick: both have new bytes
    await asyncio.sleep(0)
    assert batch.done() and trickle.done()

    full = asyncio.ensure_future(waiters.wait(1000, 2000))
    await asyncio.sleep(0)
    waiters.grew(1500)  # inside the tick and short of its batch: owed, not woken yet
    await asyncio.sleep(0)
    assert not full.done()
    assert waiters.waiting == 1
    await asyncio.wait_for(full, 1)  # the owed wake is paid by the timer at the tick's end
    waiters.close()
