"""sha256 of a fill's prefix as it grows, hashed off the event loop when it jumps."""

from __future__ import annotations

import asyncio
import hashlib
from functools import partial

from mirror.storage.blobstore import PrefixView
from mirror.storage.threads import settled


class PrefixHasher:
    """sha256 of a fill's prefix as it grows, on its own task.

    Ranged pieces land out of order, so the prefix often jumps by many megabytes at once (at
    the very end, by nearly the whole blob). Hashing that on the event loop would stall every
    client stream for a tenth of a second per 128 MiB; large steps go to a thread instead
    (hashlib releases the GIL), so sending and verifying overlap. Small steps stay inline.
    """

    STEP = 8 * 1024 * 1024
    THREAD_MIN = 1024 * 1024

    def __init__(self, view: PrefixView) -> None:
        self._view = view  # the hasher's own: closed by it, once no thread reads it
        self._hash = hashlib.sha256()
        self._done = 0
        self._target = 0
        self._final: int | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def hashed(self) -> int:
        """Bytes [0, hashed) are in the hash."""
        return self._done

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prefix hasher")

    def advance(self, upto: int) -> None:
        self._target = upto
        self._wake.set()

    async def finish(self, upto: int) -> str:
        """Hash through `upto` and stop following; returns the digest so far."""
        self._final = upto
        self._target = max(self._target, upto)
        self._wake.set()
        assert self._task is not None
        await self._task
        return self._hash.hexdigest()

    def update(self, data: bytes) -> None:
        """After finish(): go on hashing bytes that come in order (the pass-through relay)."""
        self._hash.update(data)
        self._done += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        elif self._task is None:
            self._view.close()

    async def _run(self) -> None:
        try:
            while True:
                while self._done < self._target:
                    size = min(self.STEP, self._target - self._done)
                    if size >= self.THREAD_MIN:
                        # Settled: cancelled, the view is closed next, under the thread.
                        await settled(partial(self._step, size))
                    else:
                        self._step(size)
                if self._final is not None and self._done >= self._final:
                    return
                self._wake.clear()
                if self._done >= self._target:
                    await self._wake.wait()
        finally:
            self._view.close()

    def _step(self, size: int) -> None:
        self._hash.update(self._view.pread(self._done, size))
        self._done += size
