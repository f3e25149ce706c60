"""The configuration as typed, frozen values, with every default in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class WarmConfig:
    platforms: tuple[str, ...] = ("linux/amd64",)
    concurrency: int = 4


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    warm: WarmConfig = WarmConfig()
    registries: Mapping[str, RegistryConfig] = field(
        default_factory=lambda: MappingProxyType(
            {n: RegistryConfig(n, u) for n, u in DEFAULT_REGISTRIES.items()}
        )
    )
    default_registry: str = "docker.io"
