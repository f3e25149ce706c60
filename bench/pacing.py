"""Token bucket pacing: how long a reader must wait so its bytes keep to a rate."""

from __future__ import annotations


class TokenBucket:
    """Paces bytes to `rate` per second with a burst of `burst` bytes (rate 0 = unlimited).

    The caller reads a chunk, reports it with `take`, and sleeps for what `take` returns
    before reading again: the sender then sees TCP backpressure exactly as from a slower
    link or NIC. One bucket may be shared by several connections (a node's NIC), so the
    rate is theirs together.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.free_at = 0.0  # when the emulated wire has sent everything taken so far

    def take(self, now: float, n: int) -> float:
        """Account `n` bytes read at `now` (seconds, any monotonic clock); returns the wait."""
        if not self.rate:
            self.free_at = now
            return 0.0
        self.free_at = max(self.free_at, now) + n / self.rate
        return max(0.0, self.free_at - now - self.burst / self.rate)
