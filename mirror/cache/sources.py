"""Where a fill reads from: a store's blob as a byte source, and sources in order of preference.

A fill asks the region's levels before the origin (bucket, then the owner replica, then the
registry). A source that fails a fill in any way, before its body or in the middle of it, is
left for the next one at once: the fill goes on from the byte it reached, and the trouble of a
cache level never fails a pull the origin can serve. Only the last source's failures are the
fill's own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence

import structlog

from mirror.oci.digest import Digest
from mirror.storage.blobstore import BlobStore, FileSpan, OpenBlob, StoreError
from mirror.upstream.errors import UpstreamBodyError, UpstreamError, UpstreamUnavailable
from mirror.upstream.source import RangeBody, RangeSource

log = structlog.get_logger("mirror.sources")


class StoreSource:
    """A level's copy of one blob: looked up once (its size), then read by ranges."""

    def __init__(self, store: BlobStore, digest: Digest, name: str) -> None:
        self._store = store
        self._digest = digest
        self.name = name
        self._blob: OpenBlob | None = None

    async def open(self, start: int | None = None, end: int | None = None) -> StoredBody:
        if self._blob is None:
            try:
                self._blob = await self._lookup()
            except StoreError as exc:
                raise UpstreamUnavailable(f"{self.name}: {exc}", registry=self.name) from exc
            if self._blob is None:
                raise UpstreamError(404, f"{self.name} does not have {self._digest}")
        size = self._blob.size
        first = start or 0
        stop = size if end is None else min(end + 1, size)
        if first > stop:
            raise UpstreamError(416, f"{self.name}: range past the end of {size} bytes")
        return StoredBody(self._blob, first, stop, size)

    async def _lookup(self) -> OpenBlob | None:
        return await self._store.open(self._digest)


class StoredBody:
    def __init__(self, blob: OpenBlob, start: int, stop: int, total: int) -> None:
        self._blob = blob
        self.offset = start
        self._stop = stop
        self.total = total
        self.ranged = True

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for segment in self._blob.read(self.offset, self._stop):
                # A remote level yields bytes; a fill never reads the local disk as a source.
                assert not isinstance(segment, FileSpan), "fills read remote levels only"
                yield segment
        except StoreError as exc:
            raise UpstreamBodyError(str(exc)) from exc

    def close(self) -> None:
        pass


class SourceChain:
    """Sources in order of preference, as one source. `name` is the one in use now."""

    def __init__(
        self,
        sources: Sequence[RangeSource],
        on_skip: Callable[[RangeSource, BaseException], None] = lambda source, exc: None,
    ) -> None:
        assert sources, "a fill needs somewhere to read from"
        self._sources = list(sources)
        self._at = 0
        self._on_skip = on_skip
        self.used: set[str] = set()  # names of the sources that gave bytes

    @property
    def name(self) -> str:
        return self._sources[self._at].name

    def current(self) -> str:
        """The name of the source in use now (for whoever asks later)."""
        return self.name

    async def open(self, start: int | None = None, end: int | None = None) -> RangeBody:
        while True:
            source = self._sources[self._at]
            try:
                body = await source.open(start, end)
            except Exception as exc:
                if not self.skip(source, exc):
                    raise
                continue
            return _Watched(body, source, self)

    def skip(self, source: RangeSource, exc: BaseException) -> bool:
        """`source` failed: go on with the next one (True), unless it is the last."""
        if self._sources[self._at] is not source:
            return True  # another stream of this fill moved on already
        if self._at + 1 >= len(self._sources):
            return False
        self._at += 1
        log.info(
            "fill_source_skipped", source=source.name, next=self.name,
            error=str(exc), error_type=type(exc).__name__,
        )  # fmt: skip
        self._on_skip(source, exc)
        return True


class _Watched:
    """A body whose breaking off moves its chain on: the fill's next attempt for these bytes
    goes to the next source."""

    def __init__(self, body: RangeBody, source: RangeSource, chain: SourceChain) -> None:
        self._body = body
        self._source = source
        self._chain = chain
        self.offset = body.offset
        self.total = body.total
        self.ranged = body.ranged

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for data in self._body.chunks():
                self._chain.used.add(self._source.name)
                yield data
        except UpstreamBodyError as exc:
            self._chain.skip(self._source, exc)
            raise

    def close(self) -> None:
        self._body.close()
