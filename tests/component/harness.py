"""What the component tests share: the mirror under test, its config, polling, test data."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.app import Deps, connection_protocol, create_app
from mirror.cache.blobs import BlobService
from mirror.config import CacheConfig, Config, RegistryConfig, ServerConfig, UpstreamConfig
from mirror.config.values import parse_hosts_or_networks
from mirror.http.connections import ClientConnections
from mirror.keys import blobs_key, metrics_key
from mirror.oci.digest import parse_digest
from mirror.storage.layout import Layout

KiB = 1024
MiB = 1024 * KiB

# Small enough that a 1 MiB blob is fetched as 16 concurrent Range requests.
TEST_UPSTREAM = UpstreamConfig(
    connect_timeout=1.0,
    header_timeout=2.0,
    read_timeout=5.0,
    retries=2,
    ranged_threshold=256 * KiB,
    ranged_streams=4,
    chunk_size=64 * KiB,  # the smallest the config allows
)

# The fake's CDN listens on 127.0.0.1, where no redirect may lead unless allowed.
CDN_ALLOWED = parse_hosts_or_networks("127.0.0.1")


def mirror_config(cache_dir: Path, upstream_url: str, **upstream: Any) -> Config:
    """fake.test and docker.io both lead to the fake; docker.io is the default registry."""
    registries = {
        "fake.test": RegistryConfig("fake.test", upstream_url),
        "docker.io": RegistryConfig("docker.io", upstream_url),
    }
    return Config(
        server=ServerConfig(host="127.0.0.1", port=0, admin_port=0),
        cache=CacheConfig(directory=cache_dir),
        upstream=replace(TEST_UPSTREAM, **upstream),
        registries=MappingProxyType(registries),
        default_registry="docker.io",
    )


class FakeClock:
    """The mirror's time, moved by the test: TTLs, max_stale, breaker cooldowns and
    Retry-After holds pass in an instant, and backoff sleeps move it instead of waiting.
    What the loop itself times (socket deadlines, asyncio.timeout) stays real."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_800_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)  # still a turn of the loop: others run, as after a real sleep

    def deps(self) -> Deps:
        return Deps(clock=self.monotonic, wall_clock=self.wall, sleep=self.sleep)


@dataclass
class Served:
    """The app as `mirror serve` runs it: aiohttp's runner, and the production protocol factory
    (the manifest fast path in front when config.server.fast_path) on a free loopback port."""

    app: web.Application
    runner: web.AppRunner
    listener: asyncio.Server
    url: str
    clients: ClientConnections

    @classmethod
    async def start(cls, config: Config, port: int = 0, deps: Deps | None = None) -> Served:
        """On `port` (0: a free one); a replica of a fleet listens where its peers know it."""
        app = create_app(config, deps)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        server = config.server
        clients = ClientConnections(
            server.max_connections, server.header_timeout, loop, app[metrics_key]
        )
        clients.start()
        listener = await loop.create_server(
            connection_protocol(app, runner.server, clients), "127.0.0.1", port
        )
        port = listener.sockets[0].getsockname()[1]
        return cls(app, runner, listener, f"http://127.0.0.1:{port}", clients)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        self.listener.close()
        self.clients.stop()
        await self.runner.cleanup()


class ServedClient:
    """TestClient's request API against a Served mirror, on a new connection each request: a
    connection the fast path handed to aiohttp stays there, so reuse would hide the fast path.
    Closing it stops the mirror too, as closing a TestClient does."""

    def __init__(self, server: Served) -> None:
        self.server = server
        self._session = aiohttp.ClientSession(
            base_url=server.url, connector=aiohttp.TCPConnector(force_close=True)
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._session.request(method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> Any:
        return self.request("HEAD", path, **kwargs)

    @property
    def closed(self) -> bool:
        return self._session.closed

    async def close(self) -> None:
        if not self._session.closed:
            await self._session.close()
            await self.server.stop()


@dataclass
class Mirror:
    client: TestClient | ServedClient
    app: web.Application
    config: Config

    @property
    def blobs(self) -> BlobService:
        return self.app[blobs_key]

    def metric(self, name: str, **labels: str) -> float:
        value = self.app[metrics_key].registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def requests(self, kind: str, result: str) -> float:
        return self.metric("mirror_requests_total", kind=kind, result=result)

    def blob_file(self, digest: str) -> Path:
        """Where a committed blob lives in the cache directory (looking costs no access)."""
        return Layout(self.config.cache.directory).blob(parse_digest(digest))

    def server_requests(self) -> int:
        """Requests the mirror's HTTP server has begun handling (counted before the handler)."""
        server = self.client.server.runner.server
        assert server is not None
        return server.requests_count


async def poll(predicate: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


async def wait_cached(mirror: Mirror, digest: str) -> None:
    """Until the blob is committed (the download finishes a moment after its last reader)."""
    parsed = parse_digest(digest)
    await poll(
        lambda: mirror.blobs.progress(parsed) is None and mirror.blob_file(digest).exists(),
        what=f"{digest} committed and accounted",
    )


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
