"""Loading the config: defaults < TOML file < MIRROR_* environment < CLI flags, validated once."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mirror.config import cluster as cl
from mirror.config import s3
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
from mirror.config.registries import load_registries
from mirror.config.values import (
    fraction,
    is_loopback,
    non_negative_int,
    parse_bool,
    parse_duration,
    parse_hosts_or_networks,
    parse_listen,
    parse_platforms,
    parse_size,
    positive_duration,
    positive_int,
    secret,
)

# (section, key in file/env) -> (dataclass field, parser)
_SCALARS: dict[tuple[str, str], tuple[str, Any]] = {
    ("server", "admin_token"): ("admin_token", secret),
    ("server", "access_log"): ("access_log", parse_bool),
    ("server", "fast_path"): ("fast_path", parse_bool),
    ("server", "sendfile_threads"): ("sendfile_threads", positive_int),
    ("server", "client_idle_timeout"): ("client_idle_timeout", parse_duration),
    ("server", "header_timeout"): ("header_timeout", positive_duration),
    ("server", "max_connections"): ("max_connections", positive_int),
    ("cache", "dir"): ("directory", lambda v: Path(str(v))),
    ("cache", "max_size"): ("max_size", parse_size),
    ("cache", "high_watermark"): ("high_watermark", fraction),
    ("cache", "low_watermark"): ("low_watermark", fraction),
    ("cache", "tag_ttl"): ("tag_ttl", parse_duration),
    ("cache", "max_stale"): ("max_stale", parse_duration),
    ("cache", "revalidate_timeout"): ("revalidate_timeout", parse_duration),
    ("upstream", "connect_timeout"): ("connect_timeout", parse_duration),
    ("upstream", "header_timeout"): ("header_timeout", parse_duration),
    ("upstream", "read_timeout"): ("read_timeout", parse_duration),
    ("upstream", "retries"): ("retries", non_negative_int),
    ("upstream", "ranged_threshold"): ("ranged_threshold", parse_size),
    ("upstream", "ranged_streams"): ("ranged_streams", positive_int),
    ("upstream", "chunk_size"): ("chunk_size", parse_size),
    ("upstream", "breaker_failures"): ("breaker_failures", positive_int),
    ("upstream", "breaker_cooldown"): ("breaker_cooldown", parse_duration),
    ("upstream", "redirect_allow"): ("redirect_allow", parse_hosts_or_networks),
    ("warm", "platforms"): ("platforms", parse_platforms),
    ("warm", "concurrency"): ("concurrency", positive_int),
    ("s3", "bucket"): ("bucket", s3.s3_bucket),
    ("s3", "region"): ("region", s3.s3_region),
    ("s3", "endpoint_url"): ("endpoint_url", s3.s3_endpoint_url),
    ("s3", "prefix"): ("prefix", s3.s3_prefix),
    ("s3", "redirect"): ("redirect", parse_bool),
    ("s3", "redirect_expiry"): ("redirect_expiry", s3.redirect_expiry),
    ("s3", "upload_concurrency"): ("upload_concurrency", positive_int),
    ("s3", "multipart_threshold"): ("multipart_threshold", s3.multipart_threshold),
    ("s3", "part_size"): ("part_size", s3.part_size),
    ("s3", "upload_queue"): ("upload_queue", positive_int),
    ("cluster", "peers"): ("peers", cl.peer_urls),
    ("cluster", "peers_dns"): ("peers_dns", cl.peers_dns),
    ("cluster", "self"): ("self_url", cl.optional_peer_url),
    ("cluster", "member"): ("member", parse_bool),
    ("cluster", "resolve_interval"): ("resolve_interval", cl.positive_duration),
    ("cluster", "peer_timeout"): ("peer_timeout", cl.positive_duration),
    ("cluster", "peer_down_for"): ("peer_down_for", cl.positive_duration),
}
_SECTIONS = ("server", "cache", "upstream", "warm", "s3", "cluster")
# "section.key" -> the (host, port) fields of ServerConfig an address sets.
_ADDRESSES = {
    "server.listen": ("host", "port"),
    "server.admin_listen": ("admin_host", "admin_port"),
}


def known_keys() -> frozenset[str]:
    """Every "section.key" (and default_registry) a file, the environment or a flag may set;
    registries are a table of their own (mirror.config.registries)."""
    return frozenset({"default_registry", *_ADDRESSES} | {f"{s}.{k}" for s, k in _SCALARS})


def load_config(
    environ: Mapping[str, str],
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config; raise ConfigError naming every bad key.

    `overrides` come from CLI flags and use the same "section.key" names as the file.
    """
    problems: list[str] = []
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML ({exc})"]) from exc

    # Flatten every source into "section.key" -> (origin, raw value); later sources win.
    raw: dict[str, tuple[str, Any]] = {}
    for key, value in doc.items():
        if key == "default_registry":
            raw["default_registry"] = (f"{path}: default_registry", value)
        elif key in _SECTIONS and isinstance(value, dict):
            for sub, subvalue in value.items():
                raw[f"{key}.{sub}"] = (f"{path}: {key}.{sub}", subvalue)
        elif key == "registries" and isinstance(value, dict):
            continue
        elif key in _SECTIONS:
            problems.append(f"{path}: {key} must be a table")
        else:
            problems.append(f"{path}: unknown key {key!r}")
    for name, value in environ.items():
        if not name.startswith("MIRROR_") or name.startswith("MIRROR_REGISTRY_"):
            continue
        rest = name[len("MIRROR_") :].lower()
        if rest in ("config", "log_level"):  # read by the CLI itself
            continue
        if rest == "default_registry":
            raw["default_registry"] = (f"${name}", value)
            continue
        section, _, key = rest.partition("_")
        if section in _SECTIONS:
            raw[f"{section}.{key}"] = (f"${name}", value)
        else:
            problems.append(f"${name}: unknown setting")
    for key, value in (overrides or {}).items():
        if value is not None:
            flag = {"server.listen": "--listen", "cache.dir": "--cache-dir"}.get(key, key)
            raw[key] = (flag, value)

    sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    refused: set[str] = set()  # sections with a bad value: checks across their keys would guess
    default_registry = "docker.io"
    for dotted, (origin, value) in raw.items():
        if dotted == "default_registry":
            default_registry = str(value)
            continue
        section, _, key = dotted.partition(".")
        if dotted in _ADDRESSES:
            try:
                sections["server"].update(zip(_ADDRESSES[dotted], parse_listen(value), strict=True))
            except ValueError as exc:
                problems.append(f"{origin}: {exc}")
            continue
        spec = _SCALARS.get((section, key))
        if spec is None:
            problems.append(f"{origin}: unknown setting")
            continue
        attr, parser = spec
        try:
            sections[section][attr] = parser(value)
        except (ValueError, TypeError) as exc:
            problems.append(f"{origin}: {exc}")
            refused.add(section)

    registries = load_registries(doc.get("registries"), environ, path, problems)
    if default_registry not in registries:
        problems.append(
            f"default_registry: {default_registry!r} is not among the configured registries"
        )

    server = replace(ServerConfig(), **sections["server"])
    cache = replace(CacheConfig(), **sections["cache"])
    upstream = replace(UpstreamConfig(), **sections["upstream"])
    warm = replace(WarmConfig(), **sections["warm"])
    s3_level = replace(S3Config(), **sections["s3"])
    cluster = replace(ClusterConfig(), **sections["cluster"])
    if cache.low_watermark > cache.high_watermark:
        problems.append("cache.low_watermark: must not exceed cache.high_watermark")
    if upstream.chunk_size < 64 * 1024:
        problems.append("upstream.chunk_size: must be at least 64KiB")
    if "s3" not in refused:
        problems += s3.s3_problems(s3_level)
    if "cluster" not in refused:
        problems += cl.cluster_problems(cluster)
    problems += _admin_problems(server)
    if problems:
        raise ConfigError(problems)
    return Config(
        server=server,
        cache=cache,
        upstream=upstream,
        warm=warm,
        s3=s3_level,
        cluster=cluster,
        registries=MappingProxyType(registries),
        default_registry=default_registry,
    )


def _admin_problems(server: ServerConfig) -> list[str]:
    """The admin API starts work and lists jobs: off this machine only behind a token, and
    never on the port the registry API uses."""
    problems = []
    if not is_loopback(server.admin_host) and server.admin_token is None:
        problems.append(
            f"server.admin_listen: {server.admin_host}:{server.admin_port} is reachable from "
            "other machines: set server.admin_token (MIRROR_SERVER_ADMIN_TOKEN) too, or "
            "listen on 127.0.0.1"
        )
    wildcard = ("0.0.0.0", "::")
    if server.admin_port == server.port != 0 and (
        server.admin_host == server.host or {server.host, server.admin_host} & set(wildcard)
    ):
        problems.append(
            f"server.admin_listen: port {server.admin_port} is server.listen's port: the admin "
            "API needs a listener of its own"
        )
    return problems


def describe(config: Config) -> dict[str, Any]:
    """A loggable view of the config: credentials and tokens are never included."""
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        obj = getattr(config, section)
        out[section] = {
            f.name: _shown(getattr(obj, f.name))
            for f in fields(obj)
            if f.name not in ("admin_token",)
        }
    out["registries"] = {
        n: {
            "url": r.url,
            "auth": "ecr" if r.uses_ecr else bool(r.username),
            "mirror": r.is_mirror,
            **({"aws_region": r.aws_region} if r.uses_ecr else {}),
            **({"aws_endpoint_url": r.aws_endpoint_url} if r.aws_endpoint_url else {}),
        }
        for n, r in config.registries.items()
    }
    out["default_registry"] = config.default_registry
    return out


def _shown(value: Any) -> str | list[str]:
    """A value for a log line: text, lists as lists (peers, platforms)."""
    return [str(v) for v in value] if isinstance(value, tuple) else str(value)
