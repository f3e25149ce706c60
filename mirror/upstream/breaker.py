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
    # Opened (or held) since the last success: once the wait is over, requests go one at a
    # time until one of them succeeds.
    tripped: bool = False
    # The trial request in flight may never report (its caller cancelled): its claim lapses
    # then, so the breaker cannot stay shut for good.
    trial_until: float = 0.0


class CircuitBreaker:
    """Opens after `threshold` consecutive failures (or at once on a 429 with Retry-After) for
    `cooldown` seconds; then admits one trial request at a time (half-open): its success
    closes the breaker, its failure opens it for another cooldown, and everyone else fails
    fast meanwhile, so a registry that is just coming back is not hit by the whole backlog."""

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
        """Still waiting out a cooldown or a Retry-After (a read-only look, for the gauge)."""
        state = self._states.get(registry)
        return state is not None and self._clock() < max(state.open_until, state.held_until)

    def admit(self, registry: str) -> bool:
        """May a request go to the registry now? When half-open this claims the one trial."""
        state = self._states.get(registry)
        if state is None:
            return True
        now = self._clock()
        if now < max(state.open_until, state.held_until):
            return False
        if not state.tripped:
            return True
        if now < state.trial_until:
            return False
        state.trial_until = now + self._cooldown
        return True

    def retry_in(self, registry: str) -> float:
        """Seconds until a request may be admitted again (0 when it may be now)."""
        state = self._states.get(registry)
        if state is None:
            return 0.0
        until = max(state.open_until, state.held_until)
        if state.tripped:
            until = max(until, state.trial_until)
        return max(0.0, until - self._clock())

    def success(self, registry: str) -> None:
        state = self._states.get(registry)
        if state is not None:
            state.failures = 0
            state.open_until = 0.0
            state.tripped = False
            state.trial_until = 0.0

    def failure(self, registry: str, hold_for: float | None = None) -> None:
        """`hold_for`: the origin's Retry-After, if it sent one. A zero still counts."""
        now = self._clock()
        state = self._states.setdefault(registry, _State())
        state.failures += 1
        state.trial_until = 0.0
        failed_trial = state.tripped  # however it tripped (threshold or Retry-After)
        if hold_for is not None and hold_for > 0:
            state.held_until = max(state.held_until, now + hold_for)
            state.tripped = True
        if state.failures >= self._threshold or failed_trial:
            state.open_until = now + self._cooldown
            state.tripped = True
