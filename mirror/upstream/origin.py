"""The origin registry as what blob fills read: a byte source per blob, and sizes for HEAD."""

from __future__ import annotations

from mirror.oci.digest import Digest
from mirror.upstream.client import BlobBody, RegistryClient
from mirror.upstream.errors import UpstreamError


class OriginSource:
    """Single attempts: the fill that reads it owns the retries (one schedule, not two)."""

    name = "origin"

    def __init__(self, client: RegistryClient, registry: str, repository: str, digest: Digest):
        self._client = client
        self.registry = registry
        self.repository = repository
        self._digest = str(digest)

    async def open(self, start: int | None = None, end: int | None = None) -> BlobBody:
        return await self._client.open_blob(
            self.registry, self.repository, self._digest, start, end, retry=False
        )


class OriginBlobs:
    """What the blob service asks of a registry."""

    def __init__(self, client: RegistryClient) -> None:
        self._client = client

    def source(self, registry: str, repository: str, digest: Digest) -> OriginSource:
        return OriginSource(self._client, registry, repository, digest)

    async def size(self, registry: str, repository: str, digest: Digest) -> int:
        resp = await self._client.open(
            registry, repository, f"blobs/{digest}", "HEAD", {}, kind="blob_head"
        )
        resp.release()
        if resp.content_length is None:
            raise UpstreamError(502, "upstream answered HEAD without a Content-Length")
        return resp.content_length
