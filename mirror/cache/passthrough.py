"""A fill that cannot be cached (the disk is full) goes on as a relay from memory.

The prefix already written stays readable from the fill's file; from there one sequential
stream goes on, still hashed, into a bounded buffer per follower. The slowest follower paces
it: a degraded mode that keeps its clients served rather than fast.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable

from mirror.cache.prefix_hash import PrefixHasher
from mirror.cache.transfer import RELAY_BUFFER, UNKNOWN_END


class Relay:
    """Bytes passed through to one follower from `start` on, up to `limit`."""

    def __init__(self, start: int) -> None:
        self.start = start
        # The end of what the follower asked for: bytes past it are not kept.
        self.limit = UNKNOWN_END
        self._items: collections.deque[tuple[int, bytes]] = collections.deque()
        self._bytes = 0
        self._ended = False
        self._changed = asyncio.Condition()
        self._ending: asyncio.Task[None] | None = None

    async def put(self, offset: int, data: bytes) -> None:
        if offset >= self.limit:
            return  # buffering it would only hold the relay up
        async with self._changed:
            await self._changed.wait_for(lambda: self._ended or self._bytes < RELAY_BUFFER)
            if not self._ended:
                self._items.append((offset, data))
                self._bytes += len(data)
                self._changed.notify_all()

    async def get(self) -> tuple[int, bytes] | None:
        """The next bytes and their offset; None once the relay ended and is drained."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._items or self._ended)
            if not self._items:
                return None
            offset, data = self._items.popleft()
            self._bytes -= len(data)
            self._changed.notify_all()
            return offset, data

    def end(self) -> None:
        """No more bytes (the fill ended, or the follower left: it must never hold it up)."""
        if self._ended:
            return
        self._ended = True

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        # Held here: the loop keeps only a weak reference to a task, which could vanish unrun.
        self._ending = asyncio.get_running_loop().create_task(notify())


class RelaySink:
    """Where the fill's bytes go once it passes through: the hash, then every relay."""

    def __init__(self, hasher: PrefixHasher, relays: Callable[[], Iterable[Relay]]) -> None:
        self._hasher = hasher
        self._relays = relays

    async def write(self, offset: int, data: bytes) -> None:
        self._hasher.update(data)  # one sequential stream: always in order, hashed inline
        for relay in list(self._relays()):
            await relay.put(offset, data)

    def progressed(self, prefix: int) -> None:
        pass  # followers read the relay, not the prefix
