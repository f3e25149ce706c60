"""Per-registry circuit breaker: a dead or throttling origin costs one fast failure each time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0


class CircuitBreaker:
    """Opens after `threshold` consecutive failures (or at once on a 429 with Retry-After) for
    `cooldown` seconds; then lets requests through again (half-open): one success closes it,
    one failure opens it for another cooldown."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float],
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._states: dict[str, _State] = {}

    def is_open(self, registry: str) -> bool:
        state = self._states.get(registry)
        return state is not None and self._clock() < state.open_until

    def retry_in(self, registry: str) -> float:
        state = self._states.get(registry)
        return max(0.0, state.open_until - self._clock()) if state else 0.0

    def success(self, registry: str) -> None:
        state = self._states.get(registry)
        if state and (state.failures or state.open_until):
            was_open = state.open_until > 0
            self._states[registry] = _State()
            if was_open and self._on_change:
                self._on_change(registry, False)

    def failure(self, registry: str, hold_for: float | None = None) -> None:
        state = self._states.setdefault(registry, _State())
        state.failures += 1
        if hold_for is not None or state.failures >= self._threshold:
            was_open = state.open_until > self._clock()
            state.open_until = self._clock() + (self._cooldown if hold_for is None else hold_for)
            if not was_open and self._on_change:
                self._on_change(registry, True)
