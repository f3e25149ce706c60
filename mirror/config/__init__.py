"""Typed configuration: frozen dataclasses (model), loading and validation (load), value
parsers (values) and the registries table (registries)."""

from mirror.config.load import describe, known_keys, load_config
from mirror.config.model import (
    CacheConfig,
    Config,
    ConfigError,
    ServerConfig,
    UpstreamConfig,
    WarmConfig,
)
from mirror.config.registries import DEFAULT_REGISTRIES, RegistryConfig, env_id

__all__ = [
    "DEFAULT_REGISTRIES",
    "CacheConfig",
    "Config",
    "ConfigError",
    "RegistryConfig",
    "ServerConfig",
    "UpstreamConfig",
    "WarmConfig",
    "describe",
    "env_id",
    "known_keys",
    "load_config",
]
