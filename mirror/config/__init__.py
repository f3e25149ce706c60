"""Typed configuration: frozen dataclasses (model), loading and validation (load), value
parsers (values), the registries table (registries), the [s3] and [cluster] sections."""

from mirror.config.load import describe, known_keys, load_config
from mirror.config.model import (
    CacheConfig,
    ClusterConfig,
    Config,
    ConfigError,
    S3Config,
    ServerConfig,
    UpstreamConfig,
    WarmConfig,
)
from mirror.config.registries import DEFAULT_REGISTRIES, RegistryConfig, env_id

__all__ = [
    "DEFAULT_REGISTRIES",
    "CacheConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "RegistryConfig",
    "S3Config",
    "ServerConfig",
    "UpstreamConfig",
    "WarmConfig",
    "describe",
    "env_id",
    "known_keys",
    "load_config",
]
