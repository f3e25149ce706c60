"""When to try an upstream request again, and how long to wait first: one policy for all."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from mirror.config import UpstreamConfig


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`retries` tries after the first, with jittered exponential backoff.

    One object, owned by whoever runs the attempts (the registry client for manifests and
    HEADs, the ranged fetch for blob pieces): retries that nest multiply, and two schedules
    cannot be reasoned about as one.
    """

    retries: int
    base: float = 0.1  # the first wait, before jitter
    cap: float = 5.0  # no wait of our own choosing is longer
    # However long an origin's Retry-After asks, a retry waits at most this long. Before the
    # client has headers, failing fast (and serving stale) helps it more than a long wait;
    # the pieces of a blob already streaming to clients can afford to wait longer.
    retry_after_cap: float = 2.0

    @classmethod
    def of(cls, config: UpstreamConfig, retry_after_cap: float = 2.0) -> RetryPolicy:
        return cls(config.retries, retry_after_cap=retry_after_cap)

    def may_retry(self, failures: int) -> bool:
        """After `failures` failed attempts in a row, is another one allowed?"""
        return failures <= self.retries

    def delay(
        self,
        failures: int,
        retry_after: float | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before the attempt after `failures` (>= 1) failures. Never sooner
        than the origin asked (it would fail again), jittered so waiters do not return as one."""
        if retry_after is not None and retry_after > 0:
            return min(retry_after, self.retry_after_cap) + 0.25 * jitter()
        return float(min(self.base * 2.0 ** (failures - 1), self.cap) * (0.5 + jitter()))
