"""What can go wrong upstream, in terms the services can translate into client answers."""

from __future__ import annotations


class UpstreamError(Exception):
    """The registry answered with a non-success status."""

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.retry_after = retry_after
        super().__init__(message or f"upstream answered {status}")

    @property
    def throttled(self) -> bool:
        return self.status == 429

    @property
    def transient(self) -> bool:
        """Worth serving stale for, or retrying later: rate limits and server-side failures."""
        return self.status == 429 or self.status >= 500


class UpstreamUnavailable(Exception):
    """No usable answer: connection refused or reset, timeout, or the circuit breaker is open."""

    transient = True
    status = 503
    retry_after: float | None = None


class UpstreamBodyError(Exception):
    """A body that ended early, went silent, or did not match what its headers promised."""
