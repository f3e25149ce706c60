"""The configuration as typed, frozen values, with every default in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from types import MappingProxyType

from mirror.config.registries import DEFAULT_REGISTRIES, RegistryConfig


class ConfigError(Exception):
    """Every invalid key found while loading, reported together so one fix-up round suffices."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 5000
    admin_token: str | None = field(default=None, repr=False)
    access_log: bool = True
    # Answer cached manifests without aiohttp's per-request machinery (see http/fastpath.py).
    fast_path: bool = True
    # Threads that copy cached blobs to sockets a slice at a time. A client waiting to drain
    # holds none, so this bounds parallel disk reads, not the number of clients served.
    sendfile_threads: int = 64
    # A client that takes no byte for this long is dropped, releasing its file and buffers.
    client_idle_timeout: float = 60.0
    # A client must send a whole request head within this long of its first byte (or of
    # connecting): a trickle of bytes cannot hold a descriptor for longer.
    header_timeout: float = 10.0
    # Open client connections at most; lowered at start to what the descriptor limit allows
    # with a reserve for serving. Past it, a new connection gets a 503 and is closed.
    max_connections: int = 10000
    # The admin API (/admin/...) has a listener of its own; loopback unless a token is set.
    admin_host: str = "127.0.0.1"
    admin_port: int = 5050


@dataclass(frozen=True)
class CacheConfig:
    directory: Path = Path("./mirror-cache")
    max_size: int = 0  # bytes; 0 = unbounded
    high_watermark: float = 0.90
    low_watermark: float = 0.80
    tag_ttl: float = 300.0
    max_stale: float = 7 * 86400.0
    # A cached tag waits at most this long for the upstream before it is served stale.
    revalidate_timeout: float = 3.0


@dataclass(frozen=True)
class UpstreamConfig:
    connect_timeout: float = 5.0
    header_timeout: float = 10.0  # deadline for response headers: fail fast, never hang a client
    read_timeout: float = 30.0  # longest silence inside a body before the stream counts as cut
    retries: int = 3
    ranged_threshold: int = 32 * 1024 * 1024
    ranged_streams: int = 8
    chunk_size: int = 16 * 1024 * 1024
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    # Where a blob redirect (or a token realm) may lead although the address is loopback,
    # link-local or otherwise never a CDN's: host names and networks, for private setups.
    redirect_allow: tuple[str | IPv4Network | IPv6Network, ...] = ()


@dataclass(frozen=True)
class WarmConfig:
    platforms: tuple[str, ...] = ("linux/amd64",)
    concurrency: int = 4


MiB = 1024 * 1024


@dataclass(frozen=True)
class S3Config:
    """The region's shared second level: blobs under `<prefix>blobs/sha256/<hex>` in a bucket.
    AWS credentials are never here: the standard chain finds them (IRSA, instance profile)."""

    bucket: str | None = None  # unset: no S3 level
    region: str | None = None  # required with a bucket
    endpoint_url: str | None = None  # unset: AWS's regional endpoint
    prefix: str = "mirror/"
    # Answer blob GETs of objects known to be in S3 with 307 to a presigned URL.
    redirect: bool = False
    redirect_expiry: float = 20 * 60.0
    upload_concurrency: int = 4
    multipart_threshold: int = 64 * MiB
    part_size: int = 32 * MiB
    # Uploads waiting beyond this many are dropped (and counted): S3 is a cache, not a queue.
    upload_queue: int = 1000

    @property
    def enabled(self) -> bool:
        return self.bucket is not None

    def key(self, hex_digest: str) -> str:
        """The object key of a sha256 blob."""
        return f"{self.prefix}blobs/sha256/{hex_digest}"


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas acting as one cache: each digest has one owner among the peers."""

    peers: tuple[str, ...] = ()  # base URLs, http(s)://host:port
    peers_dns: str | None = None  # host:port of a headless Service, re-resolved
    # This replica as its peers reach it (file key `self`); unset: worked out at start.
    self_url: str | None = None
    # False: a client of the ring only (a node-local mirror asking owners directly).
    member: bool = True
    resolve_interval: float = 10.0
    peer_timeout: float = 1.0  # connect and response-header deadline for a peer request
    peer_down_for: float = 30.0  # how long a failing peer is skipped

    @property
    def enabled(self) -> bool:
        return bool(self.peers) or self.peers_dns is not None

    @property
    def dns_target(self) -> tuple[str, int] | None:
        """peers_dns as (host, port)."""
        if self.peers_dns is None:
            return None
        host, _, port = self.peers_dns.rpartition(":")
        return host, int(port)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    warm: WarmConfig = WarmConfig()
    s3: S3Config = S3Config()
    cluster: ClusterConfig = ClusterConfig()
    registries: Mapping[str, RegistryConfig] = field(
        default_factory=lambda: MappingProxyType(
            {n: RegistryConfig(n, u) for n, u in DEFAULT_REGISTRIES.items()}
        )
    )
    default_registry: str = "docker.io"
