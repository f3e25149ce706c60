"""Blocking calls on worker threads, awaited to the end even by a cancelled caller."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def settled(call: Callable[[], T]) -> T:
    """Run `call` on a thread and return only once the thread is done with it, even when
    cancelled: a thread cannot be stopped, and the caller's next step may be to close the
    descriptor it is using (or unlink the path it renames). The cancel is raised after."""
    thread = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        while not thread.done():
            try:
                await asyncio.wait([thread])
            except asyncio.CancelledError:
                continue  # cancelled again: the thread is no more stoppable than before
        if not thread.cancelled():
            thread.exception()  # its outcome is the caller's to look up; the cancel wins
        raise
