"""create_app(config, deps): the one place where the long-lived objects are built and wired.

What varies between production and a test (time, sleeping, the store, the metrics registry,
where AWS credentials come from) enters through Deps; everything else is built here from the
config. Each resource has its own cleanup context, in dependency order, so a failure half-way
through start-up closes exactly what was opened.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog
from aiohttp import web

from mirror.cache.blobs import BlobService
from mirror.cache.janitor import CacheJanitor
from mirror.cache.manifests import ManifestService
from mirror.cache.ranged import FetchPlan
from mirror.cache.second import SecondLevel
from mirror.cache.uploads import Uploader
from mirror.config import Config, describe
from mirror.handlers import ops, registry
from mirror.handlers.admin import add_admin_routes, add_warm_service
from mirror.http.connections import ClientConnections, HeadWatch
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
    peers_key,
    request_ids_key,
    second_key,
    sendfile_pool_key,
    services_key,
    session_key,
    store_key,
    uploads_key,
    upstream_key,
)
from mirror.metrics import Metrics
from mirror.middleware import add_common_headers, observe
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import AccessIndex
from mirror.storage.layout import Layout
from mirror.storage.local import CacheStore
from mirror.storage.lock import CacheLock
from mirror.upstream.breaker import CircuitBreaker
from mirror.upstream.client import RegistryClient
from mirror.upstream.issuers import open_credentials
from mirror.upstream.origin import OriginBlobs
from mirror.upstream.peer import Peers
from mirror.upstream.retry import RetryPolicy
from mirror.upstream.ring import Ring, own_url
from mirror.upstream.session import open_session
from mirror.upstream.tokens import TokenCache

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

log = structlog.get_logger("mirror.app")

PEER_CONNECTIONS = 128  # to the other replicas: in-region, one stream per fill
UPSTREAM_CONNECTIONS = 512  # the upstream session's pool: descriptors kept out of clients' reach


@dataclass(frozen=True)
class Deps:
    """What the app takes from outside: production defaults, tests pass their own."""

    clock: Callable[[], float] = time.monotonic  # durations: TTL-free timeouts, breakers, fills
    wall_clock: Callable[[], float] = time.time  # what must survive a restart: tag ages
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # backoff between attempts
    store: CacheStore | None = None  # None: the filesystem store in cache.dir
    metrics: Metrics | None = None
    # Where ECR registries' AWS credentials come from; None is the standard chain:
    # environment, profile, instance role, IRSA web identity.
    aws_session: AioSession | None = None


def create_app(config: Config, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = web.Application(middlewares=[observe], client_max_size=64 * 1024)
    app[config_key] = config
    metrics = app[metrics_key] = deps.metrics or Metrics()
    metrics.track_registries(config.registries)
    metrics.track_cache_limits(
        config.cache.max_size, config.cache.high_watermark, config.cache.low_watermark
    )
    layout = Layout(config.cache.directory)
    app[store_key] = deps.store or FilesystemStore(layout)
    request_ids: Callable[[str | None], str] = RequestIds()
    app[request_ids_key] = request_ids
    app[bad_requests_key] = BadRequests(metrics.requests, deps.clock)
    # First in, last out: each context may use what the ones before it built.
    app.cleanup_ctx.append(lambda app: _cache_lock(app, layout))
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(lambda app: _credentials(app, deps.aws_session))
    app.cleanup_ctx.append(lambda app: _upstream(app, deps))
    app.cleanup_ctx.append(lambda app: _janitor(app, layout, deps))
    if config.s3.enabled:
        app.cleanup_ctx.append(lambda app: _s3(app, deps))
    if config.cluster.enabled:
        app.cleanup_ctx.append(lambda app: _cluster(app, deps))
    app.cleanup_ctx.append(lambda app: _blobs(app, deps))
    app.cleanup_ctx.append(lambda app: _manifests(app, deps))
    app.cleanup_ctx.append(_sendfile_pool)
    app.cleanup_ctx.append(_fast_path)  # reads the manifest service's memory
    add_warm_service(app)  # after the services: warming is built from them
    app.on_response_prepare.append(add_common_headers)
    app.router.add_get("/healthz", ops.healthz, allow_head=True)
    app.router.add_get("/readyz", ops.readyz, allow_head=True)
    app.router.add_get("/metrics", ops.metrics, allow_head=False)
    app.router.add_get("/v2/", registry.base, allow_head=True)
    app.router.add_get("/v2", registry.base, allow_head=True)
    app.router.add_route("*", "/v2/{tail:.*}", registry.dispatch)
    return app


def create_admin_app(app: web.Application) -> web.Application:
    """The admin API (/admin/...) as an application of its own, for server.admin_listen: the
    registry listener has no route to it at all. Start it after `app`, whose services it uses."""
    admin = web.Application(middlewares=[observe], client_max_size=64 * 1024)
    admin[config_key] = app[config_key]
    admin[metrics_key] = app[metrics_key]
    admin[request_ids_key] = app[request_ids_key]
    admin[services_key] = app
    add_admin_routes(admin)
    admin.on_response_prepare.append(add_common_headers)
    return admin


def connection_protocol(
    app: web.Application, server: web.Server, clients: ClientConnections
) -> Callable[[], asyncio.Protocol]:
    """What every accepted connection runs, for a started app and aiohttp's `server` (the
    runner's): the manifest fast path in front when configured, handing over to aiohttp's
    protocol with the mirror's parser limits, every connection counted against the cap and
    held to the request-head deadline (`clients`). `mirror serve` and the component tests
    listen with this one factory."""
    aiohttp_protocol = handler_factory(server, app[bad_requests_key], app[request_ids_key])
    if not app[config_key].server.fast_path:
        return lambda: HeadWatch(aiohttp_protocol(), clients, admitted=False)
    fast = app[fast_path_key]
    loop = asyncio.get_running_loop()

    def handed_over() -> asyncio.Protocol:
        return HeadWatch(aiohttp_protocol(), clients, admitted=True)

    return lambda: FastProtocol(fast, handed_over, loop, clients)


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


async def _cache_lock(app: web.Application, layout: Layout) -> AsyncIterator[None]:
    """One server per cache directory: another's temp files are not ours to sweep."""
    with CacheLock(layout):
        swept = await asyncio.to_thread(FilesystemStore(layout).prepare)
        log.info("mirror_started", swept_temp_files=swept, config=describe(app[config_key]))
        yield


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    up = app[config_key].upstream
    # Redirects go only where allowed; the pool's size is kept out of clients' descriptors.
    session = open_session(up, app[config_key].registries, UPSTREAM_CONNECTIONS)
    app[session_key] = session
    try:
        yield
    finally:
        await session.close()


async def _credentials(app: web.Application, aws_session: AioSession | None) -> AsyncIterator[None]:
    """Registry credentials; for ECR registries, the aiobotocore clients that issue them."""
    config = app[config_key]
    async with open_credentials(config.registries, config.upstream, aws_session) as source:
        app[credentials_key] = source
        yield


async def _upstream(app: web.Application, deps: Deps) -> AsyncIterator[None]:
    config, metrics, session = app[config_key], app[metrics_key], app[session_key]
    up = config.upstream
    tokens = TokenCache(
        session,
        aiohttp.ClientTimeout(total=up.header_timeout, sock_connect=up.connect_timeout),
        deps.clock,
    )
    breaker = CircuitBreaker(up.breaker_failures, up.breaker_cooldown, deps.clock)
    metrics.watch_breakers(config.registries, breaker.is_open)
    metrics.watch_holds(config.registries, breaker.held_for)
    app[upstream_key] = RegistryClient(
        session, config.registries, up, tokens, breaker, metrics, deps.sleep, deps.wall_clock,
        credentials=app[credentials_key],
    )  # fmt: skip
    try:
        yield
    finally:
        await app[upstream_key].close()  # its origin probes
        await tokens.close()


async def _janitor(app: web.Application, layout: Layout, deps: Deps) -> AsyncIterator[None]:
    config = app[config_key]
    janitor = CacheJanitor(
        app[store_key],
        AccessIndex(layout, deps.wall_clock),
        config.cache,
        app[metrics_key],
        lambda: shutil.disk_usage(layout.root).free,
    )
    await janitor.start()
    app[janitor_key] = janitor
    try:
        yield
    finally:
        await janitor.close()


async def _s3(app: web.Application, deps: Deps) -> AsyncIterator[None]:
    """The region's bucket: its client (made at the first call, credentials from the standard
    chain as ECR's are), its breaker, and the uploader that copies blobs into it."""
    # Imported here: aiobotocore costs a few hundred ms to import, paid only with an S3 level.
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    from mirror.aws import LazyClient
    from mirror.storage.s3 import S3Settings, S3Store

    config, metrics = app[config_key], app[metrics_key]
    s3, up = config.s3, config.upstream
    assert s3.bucket is not None and s3.region is not None
    aio_config = AioConfig(
        connect_timeout=up.connect_timeout,
        read_timeout=up.read_timeout,
        retries={"total_max_attempts": 1},  # fills and uploads own their retries
    )
    client = LazyClient(
        deps.aws_session or get_session(), "s3", s3.region, s3.endpoint_url, aio_config
    )
    store = S3Store(
        client,
        S3Settings(s3.bucket, s3.prefix, s3.multipart_threshold, s3.part_size),
        lambda operation, result: metrics.s3_requests.labels(operation, result).inc(),
    )
    breaker = CircuitBreaker(up.breaker_failures, up.breaker_cooldown, deps.clock)
    second = SecondLevel(store, breaker, s3, metrics, deps.clock)
    metrics.watch_s3(second.is_open)
    uploads = Uploader(
        app[store_key], store, s3, RetryPolicy.of(up), metrics, second.seen, deps.sleep
    )
    uploads.start()
    app[second_key], app[uploads_key] = second, uploads
    try:
        yield
    finally:
        await uploads.close()
        await second.close()
        await client.close()


async def _cluster(app: web.Application, deps: Deps) -> AsyncIterator[None]:
    """The other replicas: the ring (re-resolved from the headless Service when configured)
    and a session of their own (peers are in-region and private: not the origin's rules)."""
    config, metrics = app[config_key], app[metrics_key]
    cluster = config.cluster
    self_url = None
    if cluster.member:
        self_url = cluster.self_url or own_url(config.server.host, config.server.port)
    ring = Ring(cluster, self_url, deps.clock)
    await ring.refresh()
    metrics.watch_peers(lambda: len(ring.peers), ring.down_count)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=PEER_CONNECTIONS, limit_per_host=0),
        auto_decompress=False,  # digests cover the bytes as sent
    )
    app[peers_key] = Peers(ring, session, cluster, config.upstream, metrics)
    log.info("cluster_joined", self_url=self_url, peers=list(ring.peers), dns=cluster.peers_dns)
    # Real time, not deps.sleep: a test's instant sleep would make this loop spin.
    follow = asyncio.create_task(ring.follow(), name="peers dns") if cluster.peers_dns else None
    try:
        yield
    finally:
        if follow is not None:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
        await session.close()


async def _blobs(app: web.Application, deps: Deps) -> AsyncIterator[None]:
    up = app[config_key].upstream
    blobs = BlobService(
        app[store_key],
        OriginBlobs(app[upstream_key]),
        FetchPlan.of(up),
        # Pieces already stream to clients: they can wait out an origin's Retry-After longer
        # than a request still waiting for its headers could.
        RetryPolicy.of(up, retry_after_cap=30.0),
        app[metrics_key],
        app[janitor_key],
        deps.clock,
        deps.sleep,
        app.get(second_key),
        app.get(uploads_key),
        app.get(peers_key),
    )
    app[blobs_key] = blobs
    try:
        yield
    finally:
        await blobs.close()  # downloads cancelled, their temp files removed


async def _manifests(app: web.Application, deps: Deps) -> AsyncIterator[None]:
    manifests = ManifestService(
        app[store_key],
        app[upstream_key],
        app[config_key].cache,
        app[metrics_key],
        app[janitor_key],
        deps.wall_clock,
        app.get(second_key),
        app.get(peers_key),
    )
    app[manifests_key] = manifests
    try:
        yield
    finally:
        await manifests.close()


async def _sendfile_pool(app: web.Application) -> AsyncIterator[None]:
    pool = ThreadPoolExecutor(
        max_workers=app[config_key].server.sendfile_threads, thread_name_prefix="sendfile"
    )
    app[sendfile_pool_key] = pool
    try:
        yield
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
