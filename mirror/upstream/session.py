"""The HTTP session to origins: DNS answers checked by the redirect policy, HEADs never pooled."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from mirror.config import RegistryConfig, UpstreamConfig
from mirror.upstream.redirects import RedirectPolicy

if TYPE_CHECKING:
    from aiohttp.connector import Connection


class AddressRefused(OSError):
    """A host name resolved to an address the mirror may not connect to."""


class GuardedResolver(AbstractResolver):
    """Checks every name's addresses before a connection is made: a name for 127.0.0.1 (or
    for the metadata service) must not get past a policy that judged only the URL. aiohttp
    passes address literals by the resolver; RedirectPolicy.refusal judges those."""

    def __init__(self, policy: RedirectPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or ThreadedResolver()  # aiohttp's default without aiodns

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        reason = self._policy.address_refusal(host, port, [r["host"] for r in results])
        if reason is not None:
            raise AddressRefused(reason)  # aiohttp wraps it: see refused_address
        return results

    async def close(self) -> None:
        await self._inner.close()


def refused_address(exc: BaseException) -> AddressRefused | None:
    """The policy's refusal inside the connection error aiohttp raised, if that was the cause."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, AddressRefused):
        return exc.os_error
    return None


class _HeadResponse(aiohttp.ClientResponse):
    """A HEAD answer has no body, so aiohttp hands its connection back to the pool as soon
    as the headers are parsed. Bytes an upstream sends after them anyway (a body on a HEAD)
    are then parsed as the status line of whatever request takes that connection next, and
    that request fails ("Bad status line") or reads an answer that was never its own. HEADs
    are few (a tag revalidation per TTL): their connections are closed instead."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        if self.method == "HEAD" and connection.protocol is not None:
            connection.protocol.force_close()
        return await super().start(connection)


def open_session(
    config: UpstreamConfig, registries: Mapping[str, RegistryConfig], limit: int = 512
) -> aiohttp.ClientSession:
    """The one session every request to an origin (and to its CDN, its token realm) uses."""
    policy = RedirectPolicy.of((r.url for r in registries.values()), config.redirect_allow)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=limit, limit_per_host=0, ttl_dns_cache=300, resolver=GuardedResolver(policy)
        ),
        auto_decompress=False,  # digests cover the bytes as sent: never decode them
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
        response_class=_HeadResponse,
    )
