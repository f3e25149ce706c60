"""create_app(config): the one place where the long-lived objects are built and wired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
import structlog
from aiohttp import web

from mirror.cache.blobs import BlobService
from mirror.cache.janitor import CacheJanitor
from mirror.cache.manifests import ManifestService
from mirror.config import Config, describe
from mirror.handlers import ops, registry
from mirror.handlers.admin import add_admin_routes
from mirror.http.fastpath import FastPath, FastProtocol, fast_path_key
from mirror.http.headers import RequestIds
from mirror.http.server import BadRequests, bad_requests_key, handler_factory
from mirror.keys import (
    blobs_key,
    config_key,
    credentials_key,
    janitor_key,
    manifests_key,
    metrics_key,
    request_ids_key,
    sendfile_pool_key,
    store_key,
)
from mirror.metrics import Metrics
from mirror.middleware import add_common_headers, observe
from mirror.storage.index import AccessIndex
from mirror.storage.lock import CacheLock
from mirror.storage.store import FilesystemStore
from mirror.upstream.breaker import CircuitBreaker
from mirror.upstream.client import RegistryClient
from mirror.upstream.credentials import open_credentials
from mirror.upstream.tokens import TokenCache

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

log = structlog.get_logger("mirror.app")


def create_app(
    config: Config, metrics: Metrics | None = None, *, aws_session: AioSession | None = None
) -> web.Application:
    """`aws_session`: where ECR registries' AWS credentials come from (tests pass their own);
    None is the standard chain: environment, profile, instance role, IRSA web identity."""
    app = web.Application(middlewares=[observe], client_max_size=64 * 1024)
    app[config_key] = config
    app[metrics_key] = metrics or Metrics()
    app[metrics_key].track_registries(config.registries)
    app[metrics_key].track_cache_limits(
        config.cache.max_size, config.cache.high_watermark, config.cache.low_watermark
    )
    app[store_key] = FilesystemStore(config.cache.directory)
    request_ids: Callable[[str | None], str] = RequestIds()
    app[request_ids_key] = request_ids
    app[bad_requests_key] = BadRequests(app[metrics_key].requests, time.monotonic)
    app.cleanup_ctx.append(_cache_lock)  # first in, last out: held while any service runs
    app.cleanup_ctx.append(partial(_credentials, aws_session=aws_session))
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(_fast_path)
    add_admin_routes(app)  # after _services: the warm service is built from its blobs/manifests
    app.on_response_prepare.append(add_common_headers)
    app.router.add_get("/healthz", ops.healthz, allow_head=True)
    app.router.add_get("/readyz", ops.readyz, allow_head=True)
    app.router.add_get("/metrics", ops.metrics, allow_head=False)
    app.router.add_get("/v2/", registry.base, allow_head=True)
    app.router.add_get("/v2", registry.base, allow_head=True)
    app.router.add_route("*", "/v2/{tail:.*}", registry.dispatch)
    return app


def connection_protocol(app: web.Application, server: web.Server) -> Callable[[], asyncio.Protocol]:
    """What every accepted connection runs, for a started app and aiohttp's `server` (the
    runner's): the manifest fast path in front when configured, handing over to aiohttp's
    protocol with the mirror's parser limits. `mirror serve` and the component tests listen
    with this one factory."""
    aiohttp_protocol = handler_factory(server, app[bad_requests_key], app[request_ids_key])
    if not app[config_key].server.fast_path:
        return aiohttp_protocol
    fast = app[fast_path_key]
    loop = asyncio.get_running_loop()
    return lambda: FastProtocol(fast, aiohttp_protocol, loop)


async def _fast_path(app: web.Application) -> AsyncIterator[None]:
    """The manifest fast path reads the manifest service's memory, so it comes after it. Its
    metrics are read at scrape time: nothing to flush, no task of its own."""
    fast = FastPath(
        app[config_key], app[manifests_key], app[metrics_key].requests, app[request_ids_key]
    )
    app[fast_path_key] = fast
    try:
        yield
    finally:
        fast.close()  # idle keep-alive connections still on it


async def _cache_lock(app: web.Application) -> AsyncIterator[None]:
    """One server per cache directory: another's temp files are not ours to sweep."""
    with CacheLock(app[store_key].layout):
        yield


async def _credentials(app: web.Application, aws_session: AioSession | None) -> AsyncIterator[None]:
    """Registry credentials; for ECR registries, the aiobotocore clients that issue them."""
    config = app[config_key]
    async with open_credentials(config.registries, config.upstream, aws_session) as source:
        app[credentials_key] = source
        yield


async def _services(app: web.Application) -> AsyncIterator[None]:
    config = app[config_key]
    metrics = app[metrics_key]
    store = app[store_key]
    swept = store.prepare()
    up = config.upstream
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512, limit_per_host=0, ttl_dns_cache=300),
        auto_decompress=False,  # digests cover the bytes as sent: never decode them
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=up.connect_timeout),
    )
    tokens = TokenCache(
        session,
        aiohttp.ClientTimeout(total=up.header_timeout, sock_connect=up.connect_timeout),
        time.monotonic,
    )
    breaker = CircuitBreaker(up.breaker_failures, up.breaker_cooldown, time.monotonic)
    metrics.watch_breakers(config.registries, breaker.is_open)
    client = RegistryClient(
        session, config.registries, up, tokens, breaker, metrics,
        credentials=app[credentials_key],
    )  # fmt: skip
    janitor = CacheJanitor(store, AccessIndex(store.layout), config.cache, metrics)
    await janitor.start()
    blobs = BlobService(store, client, up, metrics, janitor)
    manifests = ManifestService(store, client, config.cache, metrics, janitor, time.time)
    pool = ThreadPoolExecutor(
        max_workers=config.server.sendfile_threads, thread_name_prefix="sendfile"
    )
    app[sendfile_pool_key] = pool
    app[blobs_key] = blobs
    app[janitor_key] = janitor
    app[manifests_key] = manifests
    log.info("mirror_started", swept_temp_files=swept, config=describe(config))
    try:
        yield
    finally:
        await blobs.close()
        await manifests.close()
        await janitor.close()
        await session.close()
        pool.shutdown(wait=False, cancel_futures=True)
