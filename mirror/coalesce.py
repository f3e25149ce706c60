"""Coalescing: one task per key, however many ask while it runs; owned here, not by a caller.

Every shared piece of work (a blob's fill, a manifest fetch, a tag revalidation, a token, an
ECR credential) runs as a task of its owner, in a fresh context: any caller may be cancelled
(its client hung up) without cancelling what the others wait for, and the work's log lines
carry no one caller's request id. Owners close their flights in their cleanup, which
cancels and awaits what is still running.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Hashable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
V = TypeVar("V")


def _spawn(work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    return asyncio.get_running_loop().create_task(work, name=name, context=contextvars.Context())


class SingleFlight(Generic[K, T]):
    """Results by key: callers that ask while the work runs share its outcome."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: dict[K, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def running(self, key: K) -> bool:
        return key in self._tasks

    def launch(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        """The task for `key`, started from `work` if none runs. Not awaiting it is fine:
        its failure is retrieved here, never reported as unhandled."""
        task = self._tasks.get(key)
        if task is None:
            task = _spawn(work(), f"{self._name} {key}")
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return task

    async def do(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> tuple[T, bool]:
        """(result, shared): shared is True when this caller joined work already under way."""
        shared = key in self._tasks
        return await asyncio.shield(self.launch(key, work)), shared

    def _forget(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not "never retrieved"

    async def close(self) -> None:
        await _cancel_all(list(self._tasks.values()))


class InFlight(Generic[K, V]):
    """Objects that own a running task, by key (a blob's one fill): callers join the object,
    and the object leaves the table the moment it says it is finished."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._objects: dict[K, V] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[V]:
        return iter(list(self._objects.values()))

    def get(self, key: K) -> V | None:
        return self._objects.get(key)

    def start(self, key: K, obj: V, run: Coroutine[Any, Any, None]) -> V:
        """Register `obj` under `key` and run `run` (its work) as a task of the table's."""
        assert key not in self._objects, "one object per key: join the running one"
        self._objects[key] = obj
        task = _spawn(run, f"{self._name} {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return obj

    def finished(self, key: K, obj: V) -> bool:
        """`obj` is done (synchronously, so no caller joins it after); False if it was not
        the one registered."""
        if self._objects.get(key) is obj:
            del self._objects[key]
            return True
        return False

    async def close(self) -> None:
        await _cancel_all(list(self._tasks))


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
