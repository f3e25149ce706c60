"""A blob body for the HTTP layer to write: segments (bytes or file spans), then close.

The handler never sees descriptors, fills or verdicts: it asks for segments of a range and
writes them, and learns only whether the body failed, and whether what it sent was wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from mirror.cache.errors import to_registry_error
from mirror.cache.follow import Follower
from mirror.cache.transfer import DigestMismatch, DownloadFailed
from mirror.oci.errors import ErrorCode

# FileSpan and Segment are what the HTTP layer sends: it takes them from here, not storage.
from mirror.storage.blobstore import FileSpan as FileSpan
from mirror.storage.blobstore import OpenBlob
from mirror.storage.blobstore import Segment as Segment

# A blob this small is verified before its headers go out: waiting costs one small fetch,
# and a mismatch then becomes an error the client falls back from (containerd tries the
# next host) instead of a body it has nearly all of: a pull retried within containerd's GC
# window would glue the good last byte onto those wrong ones. Image configs are a few KiB
# to a few tens; larger blobs stream before their verdict, the last byte held back.
VERIFY_FIRST = 64 * 1024


class BodyFailed(Exception):
    """The body cannot be completed. `wrong_bytes`: what was sent so far is not the blob's
    (its digest did not match), so the client must not be invited to resume it."""

    def __init__(self, cause: BaseException, wrong_bytes: bool) -> None:
        self.cause = cause
        self.wrong_bytes = wrong_bytes
        super().__init__(str(cause))


@dataclass(frozen=True, slots=True)
class Redirect:
    """The client is sent elsewhere for the bytes (a presigned URL of the region's bucket)."""

    url: str
    size: int
    result: str = "hit"


class BlobBody:
    """One client's body of one blob."""

    size: int
    result: str  # hit | miss | coalesced

    @property
    def source(self) -> str:
        """Where its bytes came from (disk, s3, peer, origin), as far as known now."""
        raise NotImplementedError

    async def ready(self, start: int, end: int) -> None:
        """Before the headers: raises RegistryError when no body can follow."""

    def segments(self, start: int, end: int) -> AsyncGenerator[Segment, None]:
        """Bytes [start, end); raises BodyFailed when they cannot all be given."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class CachedBody(BlobBody):
    def __init__(self, blob: OpenBlob, pin: contextlib.AbstractContextManager[None]) -> None:
        self.size = blob.size
        self.result = "hit"
        self._blob = blob
        self._held = contextlib.ExitStack()
        self._held.enter_context(pin)  # eviction passes it over while it is being sent
        self._held.callback(blob.close)

    @property
    def source(self) -> str:
        return "disk"

    def segments(self, start: int, end: int) -> AsyncGenerator[Segment, None]:
        return self._blob.read(start, end)

    def close(self) -> None:
        self._held.close()


class LiveBody(BlobBody):
    """A blob still filling: the follower gives what has landed and been verified."""

    def __init__(
        self, follower: Follower, size: int, result: str, source: Callable[[], str]
    ) -> None:
        self.size = size
        self.result = result
        self._source = source  # the fill's source of the moment: it may move down its chain
        self._follower = follower

    @property
    def source(self) -> str:
        return self._source()

    async def ready(self, start: int, end: int) -> None:
        # An empty body has no last byte to hold back: its verdict comes before its headers.
        if start < end and self.size > VERIFY_FIRST:
            return
        try:
            await self._follower.verdict()
        except DownloadFailed as exc:
            raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc

    async def segments(self, start: int, end: int) -> AsyncGenerator[Segment, None]:
        try:
            async for segment in self._follower.segments(start, end):
                yield segment
        except DownloadFailed as exc:
            raise BodyFailed(exc.cause, isinstance(exc.cause, DigestMismatch)) from exc

    def close(self) -> None:
        self._follower.close()
