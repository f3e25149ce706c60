"""A byte source for blob fills: something that answers Range requests for one blob.

The download machinery (mirror.cache) fetches from "a source", never from an HTTP library:
the origin registry, the region's bucket or a peer replica each implement this. A source
raises the upstream errors (mirror.upstream.errors): UpstreamError for an answer with a
status, UpstreamUnavailable when there was none, UpstreamBodyError when a body broke off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class RangeBody(Protocol):
    """An open answer; `offset` is where its first byte sits in the blob."""

    @property
    def offset(self) -> int: ...

    @property
    def total(self) -> int | None:
        """The blob's whole size, when the answer says."""
        ...

    @property
    def ranged(self) -> bool:
        """Answered as a range; otherwise it is the whole blob from byte 0."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamBodyError if it breaks off or goes silent."""
        ...

    def close(self) -> None:
        """Done with it (a half-read connection is not worth keeping)."""
        ...


class RangeSource(Protocol):
    @property
    def name(self) -> str:
        """Where the bytes come from, for metrics and logs: origin, s3, peer."""
        ...

    async def open(self, start: int | None = None, end: int | None = None) -> RangeBody:
        """The blob, or bytes start..end (inclusive; end None = to the end). One attempt:
        whoever asks decides whether and when to try again."""
        ...
