"""Other replicas as byte sources: a digest's owner serves it, filled once for the region.

A peer is asked exactly as a client would ask it (`?ns=` names the registry), marked with
PEER_HEADER so it never asks a peer in turn. Reads are open-ended ranges (`bytes=N-`): the
owner holds back only the last byte of a response until its fill is verified, and a range
that ends early would stall at its own last byte. A peer that cannot connect, is slow with
its headers or breaks off is marked down for a while; the fill moves to the next source.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from urllib.parse import quote

import aiohttp
import structlog

from mirror.config import ClusterConfig, UpstreamConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.oci.peering import PEER_HEADER
from mirror.upstream.client import MAX_MANIFEST_BYTES, parse_content_range
from mirror.upstream.errors import UpstreamBodyError, UpstreamError, UpstreamUnavailable
from mirror.upstream.ring import Ring

log = structlog.get_logger("mirror.peer")

NAME = "peer"


class Peers:
    """The ring and the session to its members, for the services."""

    def __init__(
        self,
        ring: Ring,
        session: aiohttp.ClientSession,
        cluster: ClusterConfig,
        upstream: UpstreamConfig,
        metrics: Metrics,
    ) -> None:
        self.ring = ring
        self._session = session
        # A peer's headers wait for its own first answer from the origin when it fills, so
        # they get the registry's deadline; connecting is in-region and must be quick.
        self._headers_within = cluster.peer_timeout + upstream.header_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cluster.peer_timeout, sock_read=upstream.read_timeout
        )
        self._metrics = metrics

    def sources(self, registry: str, name: str, digest: Digest) -> list[PeerSource]:
        return [PeerSource(self, p, registry, name, digest) for p in self.ring.owners(digest.hex)]

    async def manifest(self, registry: str, name: str, digest: Digest) -> tuple[bytes, str] | None:
        """A manifest by digest from its owner, when another replica owns it."""
        for peer in self.ring.owners(digest.hex):
            try:
                resp = await self.get(peer, registry, name, f"manifests/{digest}", {})
            except (UpstreamError, UpstreamUnavailable):
                continue
            try:
                body = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed(peer, f"manifest body failed: {type(exc).__name__}")
                continue
            finally:
                resp.release()
            if len(body) <= MAX_MANIFEST_BYTES:
                return body, resp.headers.get("Content-Type", "")
        return None

    async def get(
        self, peer: str, registry: str, name: str, suffix: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        url = f"{peer}/v2/{name}/{suffix}?ns={quote(registry, safe='')}"
        try:
            async with asyncio.timeout(self._headers_within):
                resp = await self._session.get(
                    url, headers={**headers, PEER_HEADER: "1"}, allow_redirects=False,
                    timeout=self._timeout,
                )  # fmt: skip
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError included
            self.failed(peer, type(exc).__name__)
            raise UpstreamUnavailable(f"peer {peer}: {type(exc).__name__}") from exc
        if resp.status >= 500:
            resp.release()
            self.failed(peer, f"answered {resp.status}")
            raise UpstreamError(resp.status, f"peer {peer} answered {resp.status}")
        if resp.status >= 300:
            resp.release()
            self._sent("refused")
            self.ring.answered(peer)  # alive, it just cannot serve this one
            raise UpstreamError(resp.status, f"peer {peer} answered {resp.status}")
        self._sent("ok")
        self.ring.answered(peer)
        return resp

    def failed(self, peer: str, why: str) -> None:
        self._sent("error")
        self.ring.failed(peer, why)

    def _sent(self, result: str) -> None:
        self._metrics.peer_requests.labels("sent", result).inc()


class PeerSource:
    name = NAME

    def __init__(self, peers: Peers, peer: str, registry: str, name: str, digest: Digest):
        self._peers = peers
        self.peer = peer
        self._registry = registry
        self._repository = name
        self._digest = digest

    async def open(self, start: int | None = None, end: int | None = None) -> PeerBody:
        first = start or 0
        resp = await self._peers.get(
            self.peer, self._registry, self._repository, f"blobs/{self._digest}",
            {"Range": f"bytes={first}-"},
        )  # fmt: skip
        span = parse_content_range(resp.headers.get("Content-Range"))
        if resp.status != 206 or span is None or span[0] != first:
            resp.close()
            raise UpstreamBodyError(f"peer {self.peer} answered {first}- without that range")
        limit = None if end is None else end - first + 1
        return PeerBody(self._peers, self.peer, resp, first, span[2], limit)


class PeerBody:
    def __init__(
        self,
        peers: Peers,
        peer: str,
        resp: aiohttp.ClientResponse,
        offset: int,
        total: int | None,
        limit: int | None,
    ) -> None:
        self._peers = peers
        self._peer = peer
        self._resp = resp
        self.offset = offset
        self.total = total
        self.ranged = True
        self._limit = limit  # bytes wanted: the rest of an open-ended answer is dropped

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        left = self._limit
        try:
            async for data in self._resp.content.iter_any():
                if left is not None:
                    data = data[:left]
                    left -= len(data)
                yield data
                if left == 0:
                    return
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._peers.failed(self._peer, f"body broke off: {type(exc).__name__}")
            raise UpstreamBodyError(f"peer {self._peer}: {type(exc).__name__}") from exc

    def close(self) -> None:
        self._resp.close()
