"""What can go wrong upstream, in terms the services can translate into client answers."""

from __future__ import annotations

import re
from datetime import UTC
from email.utils import parsedate_to_datetime

# However long a registry asks us to wait, we ask again after this: one bad header must not
# lock a registry out until the next restart.
MAX_RETRY_AFTER = 3600.0
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or an HTTP-date, RFC 9110),
    at most MAX_RETRY_AFTER; None when absent or unreadable. `now` is wall-clock epoch
    seconds, which an HTTP-date is compared with."""
    text = (value or "").strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000" and asctime dates: HTTP-dates are always GMT
            when = when.replace(tzinfo=UTC)
        wait = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # garbage (or "inf", "nan", "-5"): fall back to our own backoff
    return min(max(0.0, wait), MAX_RETRY_AFTER)


class UpstreamError(Exception):
    """The registry answered with a non-success status."""

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        code: str | None = None,
        retry_after: float | None = None,
        registry: str = "",
    ) -> None:
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.registry = registry  # which origin, for the client's error message
        super().__init__(message or f"upstream answered {status}")

    @property
    def throttled(self) -> bool:
        return self.status == 429

    @property
    def transient(self) -> bool:
        """Worth serving stale for, or retrying later: rate limits and server-side failures."""
        return self.status == 429 or self.status >= 500


class UpstreamUnavailable(Exception):
    """No usable answer: connection refused or reset, timeout, or the circuit breaker is open.
    `retry_after`: when the mirror itself will ask again, if it refused to ask now."""

    transient = True
    status = 503

    def __init__(
        self,
        message: str = "",
        *,
        registry: str = "",
        retry_after: float | None = None,
        unreachable: bool = False,
    ) -> None:
        self.registry = registry
        self.retry_after = retry_after
        # No connection could be made or kept (refused, reset, DNS): quick to find out, so
        # worth another attempt even before a client has headers. A silent registry, an
        # open breaker or missing credentials are not: trying again would only make it wait.
        self.unreachable = unreachable
        super().__init__(message or "upstream registry unavailable")


class NoCredentials(UpstreamUnavailable):
    """The registry's credentials cannot be had (its issuer is unreachable or refuses): every
    request to it fails alike, whatever it asks for."""


class UpstreamRefused(Exception):
    """An answer the mirror will not act on: a redirect (or a token realm) leading where a
    registry may not send it. Not retried: the same answer would be refused again."""

    transient = False
    status = 502

    def __init__(self, message: str, *, registry: str = "") -> None:
        self.registry = registry
        super().__init__(message)


class UpstreamBodyError(Exception):
    """A body that ended early, went silent, or did not match what its headers promised."""
