"""Blobs: served from disk when cached, else from the one shared download of them."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path

from mirror.cache.download import BlobDownload
from mirror.cache.errors import to_registry_error
from mirror.cache.janitor import CacheJanitor
from mirror.cache.reader import DownloadReader
from mirror.cache.singleflight import SingleFlight
from mirror.cache.transfer import DigestMismatch, DownloadFailed, State
from mirror.config import UpstreamConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.storage.store import FilesystemStore
from mirror.upstream.client import RegistryClient
from mirror.upstream.errors import UpstreamError


@dataclass(frozen=True, slots=True)
class CachedBlob:
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class LiveBlob:
    """A blob still downloading: the reader follows it as bytes land."""

    size: int
    reader: DownloadReader


@dataclass(frozen=True, slots=True)
class Opened:
    source: CachedBlob | LiveBlob
    result: str  # hit | miss | coalesced


class BlobService:
    def __init__(
        self,
        store: FilesystemStore,
        client: RegistryClient,
        config: UpstreamConfig,
        metrics: Metrics,
        janitor: CacheJanitor,
    ) -> None:
        self._janitor = janitor
        self._store = store
        self._client = client
        self._config = config
        self._metrics = metrics
        self._downloads: dict[str, BlobDownload] = {}
        # Upstream HEADs, by repository too: one that lacks the blob must not answer for one
        # that has it.
        self._heads: SingleFlight[int] = SingleFlight()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._downloads)

    def cached(self, digest: Digest) -> CachedBlob | None:
        size = self._store.blob_size(digest)
        if size is None:
            self._janitor.missing(digest)
            return None
        self._janitor.accessed(digest)
        return CachedBlob(self._store.blob_path(digest), size)

    def serving(self, digest: Digest) -> contextlib.AbstractContextManager[None]:
        """Hold while sending a cached blob: eviction passes it over."""
        return self._janitor.pinned(digest)

    async def open(self, registry: str, name: str, digest: Digest, rejoin: bool = True) -> Opened:
        """The bytes of a blob: from disk, or following its download (started if need be).

        Downloads are shared by digest across repositories (a base layer is one download for
        every image built on it). One started for a repository that lacks the blob, or that
        the mirror may not read, fails for that reason only: a caller that joined it from
        another repository then tries once with its own."""
        hit = self.cached(digest)
        if hit is not None:
            return Opened(hit, "hit")
        try:
            download, result = self._download(registry, name, digest)
            reader = download.reader()
        except OSError as exc:  # no temp file or descriptor to be had (EMFILE, EROFS, ...)
            raise RegistryError(
                ErrorCode.UNAVAILABLE, f"cache storage unavailable: {exc.strerror}"
            ) from exc
        try:
            size = await download.wait_sized()
        except DownloadFailed as exc:
            reader.close()
            if rejoin and _theirs_alone(download, registry, name, exc):
                return await self.open(registry, name, digest, rejoin=False)
            raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
        except BaseException:
            reader.close()
            raise
        return Opened(LiveBlob(size, reader), result)

    async def size(self, registry: str, name: str, digest: Digest) -> tuple[int, str]:
        """For HEAD: never starts a download of a whole blob just to learn its size."""
        hit = self.cached(digest)
        if hit is not None:
            return hit.size, "hit"
        download = self._downloads.get(digest.hex)
        try:
            if download is not None:
                try:
                    return await download.wait_sized(), "coalesced"
                except DownloadFailed as exc:
                    if not _theirs_alone(download, registry, name, exc):
                        raise
            size, shared = await self._heads.do(
                (registry, name, digest.hex), lambda: self._upstream_size(registry, name, digest)
            )
        except Exception as exc:  # noqa: BLE001 - translated for the client
            raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
        return size, "coalesced" if shared else "miss"

    async def _upstream_size(self, registry: str, name: str, digest: Digest) -> int:
        resp = await self._client.open(
            registry, name, f"blobs/{digest}", "HEAD", {}, kind="blob_head"
        )
        resp.release()
        if resp.content_length is None:
            raise RegistryError(
                ErrorCode.UPSTREAM_ERROR, "upstream answered HEAD without a Content-Length"
            )
        return resp.content_length

    async def fetch(self, registry: str, name: str, digest: Digest) -> str:
        """Make sure a blob is cached (for warming); returns hit, miss or coalesced."""
        if self.cached(digest) is not None:
            return "hit"
        download, result = self._download(registry, name, digest)
        try:
            await download.wait_done()
        except DownloadFailed as exc:
            if not _theirs_alone(download, registry, name, exc):
                raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
            download, result = self._download(registry, name, digest)
            try:
                await download.wait_done()
            except DownloadFailed as again:
                raise to_registry_error(again, ErrorCode.BLOB_UNKNOWN) from again
        return result

    def progress(self, digest: Digest) -> tuple[int, int | None] | None:
        """(bytes so far, size) of a download in flight, for job status."""
        download = self._downloads.get(digest.hex)
        return (download.contiguous, download.size) if download else None

    def _download(self, registry: str, name: str, digest: Digest) -> tuple[BlobDownload, str]:
        download = self._downloads.get(digest.hex)
        if download is not None:  # a failed one is gone already: _finished runs synchronously
            return download, "coalesced"
        download = BlobDownload(
            digest, registry, name, self._client, self._store, self._config,
            self._finished, self._janitor.make_room,
        )  # fmt: skip
        self._downloads[digest.hex] = download
        self._metrics.downloads_in_flight.inc()
        # A fresh context: the download is the service's, not the request's that started it,
        # so its log lines must not carry that request's id.
        task = asyncio.create_task(
            download.run(), name=f"download {digest}", context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return download, "miss"

    def _finished(self, download: BlobDownload) -> None:
        if self._downloads.get(download.digest.hex) is download:
            del self._downloads[download.digest.hex]
            self._metrics.downloads_in_flight.dec()
        if download.state is State.COMMITTED and download.size is not None:
            self._janitor.stored(download.digest, download.size)
        if download.passed_through and download.state is State.RUNNING:
            self._metrics.cache_write_failures.labels("enospc").inc()
        if isinstance(download.error, DigestMismatch):
            self._metrics.digest_mismatches.labels(download.registry).inc()

    async def close(self) -> None:
        """Shutdown: cancel downloads; each discards its temp file, so nothing partial remains."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._heads.close()


def _theirs_alone(download: BlobDownload, registry: str, name: str, exc: DownloadFailed) -> bool:
    """A failure that may concern only the repository the download was started for: it lacks
    the blob, or the mirror may not read it. Anything else (an outage, a full disk, wrong
    bytes) would fail this repository's own try the same way, so it is not worth one."""
    cause = exc.cause
    return (
        (download.registry, download.name) != (registry, name)
        and isinstance(cause, UpstreamError)
        and cause.status in (401, 403, 404)
    )
