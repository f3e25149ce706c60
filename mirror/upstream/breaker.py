"""Per-registry circuit breaker: a dead or throttling origin costs one fast failure each time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    # A 429's Retry-After: the origin asked us to wait. Another request's success does not
    # lift it (other scopes or cached tokens may still get through), only time does.
    held_until: float = 0.0


class CircuitBreaker:
    """Opens after `threshold` consecutive failures (or at once on a 429 with Retry-After) for
    `cooldown` seconds; then lets requests through again (half-open): one success closes it,
    one failure opens it for another cooldown."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float],
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._states: dict[str, _State] = {}

    def is_open(self, registry: str) -> bool:
        state = self._states.get(registry)
        return state is not None and self._clock() < max(state.open_until, state.held_until)

    def retry_in(self, registry: str) -> float:
        state = self._states.get(registry)
        if state is None:
            return 0.0
        return max(0.0, max(state.open_until, state.held_until) - self._clock())

    def success(self, registry: str) -> None:
        state = self._states.get(registry)
        if state is not None:
            state.failures = 0
            state.open_until = 0.0

    def failure(self, registry: str, hold_for: float | None = None) -> None:
        now = self._clock()
        state = self._states.setdefault(registry, _State())
        state.failures += 1
        if hold_for is not None:
            state.held_until = max(state.held_until, now + hold_for)
        elif state.failures >= self._threshold:
            state.open_until = now + self._cooldown
