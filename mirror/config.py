"""Typed configuration: defaults < TOML file < MIRROR_* environment < CLI flags, validated once."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from mirror.config_values import (
    fraction,
    non_negative_int,
    optional_str,
    parse_bool,
    parse_duration,
    parse_listen,
    parse_platforms,
    parse_size,
    positive_int,
)

DEFAULT_REGISTRIES: Mapping[str, str] = MappingProxyType(
    {
        "docker.io": "https://registry-1.docker.io",
        "ghcr.io": "https://ghcr.io",
        "quay.io": "https://quay.io",
        "registry.k8s.io": "https://registry.k8s.io",
        "public.ecr.aws": "https://public.ecr.aws",
        "mcr.microsoft.com": "https://mcr.microsoft.com",
    }
)


class ConfigError(Exception):
    """Every invalid key found while loading, reported together so one fix-up round suffices."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class RegistryConfig:
    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # The url is another mirror (a regional tier): forward ?ns=<name> so it can route.
    is_mirror: bool = False
    # Amazon ECR: credentials come from GetAuthorizationToken in this region, signed with
    # whatever the AWS credential chain finds (env, profile, instance role, IRSA), not from here.
    aws_region: str | None = None
    # Where that call goes instead of the public ECR API: a VPC interface endpoint (or moto).
    aws_endpoint_url: str | None = None

    @property
    def uses_ecr(self) -> bool:
        return self.aws_region is not None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 5000
    admin_token: str | None = field(default=None, repr=False)
    access_log: bool = True
    # Answer cached manifests without aiohttp's per-request machinery (see handlers/fastpath).
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


# (section, key in file/env) -> (dataclass field, parser)
_SCALARS: dict[tuple[str, str], tuple[str, Any]] = {
    ("server", "admin_token"): ("admin_token", optional_str),
    ("server", "access_log"): ("access_log", parse_bool),
    ("server", "fast_path"): ("fast_path", parse_bool),
    ("server", "sendfile_threads"): ("sendfile_threads", positive_int),
    ("server", "client_idle_timeout"): ("client_idle_timeout", parse_duration),
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
    ("upstream", "retries"): ("retries", lambda v: non_negative_int(v)),
    ("upstream", "ranged_threshold"): ("ranged_threshold", parse_size),
    ("upstream", "ranged_streams"): ("ranged_streams", positive_int),
    ("upstream", "chunk_size"): ("chunk_size", parse_size),
    ("upstream", "breaker_failures"): ("breaker_failures", positive_int),
    ("upstream", "breaker_cooldown"): ("breaker_cooldown", parse_duration),
    ("warm", "platforms"): ("platforms", parse_platforms),
    ("warm", "concurrency"): ("concurrency", positive_int),
}
_SECTIONS = ("server", "cache", "upstream", "warm")
# No user info in URLs: credentials belong in username/password, which are never logged.
_URL = re.compile(r"https?://[^/@\s]+(?:/|$)")
_REGISTRY_KEYS = {"url", "username", "password", "mirror", "aws_region", "aws_endpoint_url"}
# us-east-1, eu-central-2, us-gov-west-1, cn-north-1, us-isob-east-1: a typo fails at start,
# not as a DNS error on the first pull.
_AWS_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}")
# Registry names become cache directory names: hosts only, never "..", "/" or spaces.
# Lowercase only: routing lowercases the host a client names, so "GHCR.io" would be unreachable.
_REGISTRY_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?")


def env_id(registry: str) -> str:
    """docker.io -> DOCKER_IO, 127.0.0.1:5000 -> 127_0_0_1_5000 (for MIRROR_REGISTRY_<ID>_*)."""
    return re.sub(r"[^A-Z0-9]", "_", registry.upper())


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
    default_registry = "docker.io"
    for dotted, (origin, value) in raw.items():
        if dotted == "default_registry":
            default_registry = str(value)
            continue
        section, _, key = dotted.partition(".")
        if (section, key) == ("server", "listen"):
            try:
                host, port = parse_listen(value)
                sections["server"].update(host=host, port=port)
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

    registries = _load_registries(doc.get("registries"), environ, path, problems)
    if default_registry not in registries:
        problems.append(
            f"default_registry: {default_registry!r} is not among the configured registries"
        )

    server = replace(ServerConfig(), **sections["server"])
    cache = replace(CacheConfig(), **sections["cache"])
    upstream = replace(UpstreamConfig(), **sections["upstream"])
    warm = replace(WarmConfig(), **sections["warm"])
    if cache.low_watermark > cache.high_watermark:
        problems.append("cache.low_watermark: must not exceed cache.high_watermark")
    if upstream.chunk_size < 64 * 1024:
        problems.append("upstream.chunk_size: must be at least 64KiB")
    if problems:
        raise ConfigError(problems)
    return Config(
        server=server,
        cache=cache,
        upstream=upstream,
        warm=warm,
        registries=MappingProxyType(registries),
        default_registry=default_registry,
    )


def _load_registries(
    table: Any, environ: Mapping[str, str], path: Path | None, problems: list[str]
) -> dict[str, RegistryConfig]:
    """A [registries] table in the file is the complete set; without one the defaults apply."""
    result: dict[str, RegistryConfig] = {}
    if table is None:
        result = {n: RegistryConfig(n, u) for n, u in DEFAULT_REGISTRIES.items()}
    elif not isinstance(table, dict):
        problems.append(f"{path}: registries must be a table")
    else:
        for name, entry in table.items():
            where = f"{path}: registries.{name!r}"
            if not _REGISTRY_NAME.fullmatch(name):
                problems.append(f"{where}: a registry is named by its lowercase host[:port]")
                continue
            if not isinstance(entry, dict):
                problems.append(f"{where}: must be a table with at least url")
                continue
            registry = _registry_entry(name, entry, where, problems)
            if registry is not None:
                result[name] = registry
    # Credentials are best kept out of files: MIRROR_REGISTRY_<ID>_<KEY> for these keys.
    # The longer suffixes come first: _AWS_ENDPOINT_URL also ends in _URL.
    by_id = {env_id(n): n for n in result}
    for var, value in environ.items():
        if not var.startswith("MIRROR_REGISTRY_"):
            continue
        rest = var[len("MIRROR_REGISTRY_") :]
        for suffix, attr in _REGISTRY_ENV:
            if rest.endswith(suffix) and rest[: -len(suffix)] in by_id:
                name = by_id[rest[: -len(suffix)]]
                try:
                    parsed = _REGISTRY_PARSERS[attr](value)
                except ValueError as exc:
                    problems.append(f"${var}: {exc}")
                    break
                result[name] = replace(result[name], **{attr: parsed})
                break
        else:
            problems.append(f"${var}: names no configured registry (ids: {sorted(by_id)})")
    for name, registry in result.items():
        if registry.uses_ecr and (registry.username or registry.password):
            problems.append(
                f"registries.{name!r}: username/password and aws_region exclude each other "
                "(with aws_region, ECR issues the credentials)"
            )
        elif registry.aws_endpoint_url and not registry.uses_ecr:
            problems.append(f"registries.{name!r}.aws_endpoint_url: needs aws_region")
    return result


def _registry_entry(
    name: str, entry: dict[str, Any], where: str, problems: list[str]
) -> RegistryConfig | None:
    """One [registries."<name>"] table; None (with every bad key named) when it is unusable."""
    found = len(problems)
    unknown = set(entry) - _REGISTRY_KEYS
    if unknown:
        problems.append(f"{where}: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, attr in (("url", "url"), ("mirror", "is_mirror"), ("aws_region", "aws_region"),
                      ("aws_endpoint_url", "aws_endpoint_url")):  # fmt: skip
        if key not in entry and key != "url":
            continue
        try:
            values[attr] = _REGISTRY_PARSERS[attr](entry.get(key))
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}.{key}: {exc}")
    if len(problems) > found:
        return None
    return RegistryConfig(
        name=name,
        username=optional_str(entry.get("username", "")),
        password=optional_str(entry.get("password", "")),
        **values,
    )


def _registry_url(value: Any) -> str:
    if not isinstance(value, str) or not _URL.match(value):
        raise ValueError(f"expected http(s)://host[:port], got {_shown(value)}")
    return value.rstrip("/")


def _aws_endpoint_url(value: Any) -> str:
    """https only: GetAuthorizationToken's reply is the registry password. Plain http is for
    a stand-in (moto) on this machine, where nothing travels over a network."""
    url = _registry_url(value)
    if url.startswith("http://") and not _is_loopback(urlsplit(url).hostname or ""):
        raise ValueError(
            f"must be https:// (the reply carries the registry password), got {url!r}; "
            "http:// only to a loopback host (127.0.0.0/8, ::1, localhost)"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _aws_region(value: Any) -> str:
    if not isinstance(value, str) or not _AWS_REGION.fullmatch(value):
        raise ValueError(f"expected an AWS region like us-east-1, got {value!r}")
    return value


_REGISTRY_PARSERS: Mapping[str, Any] = MappingProxyType(
    {
        "url": _registry_url,
        "is_mirror": parse_bool,
        "username": lambda v: str(v) or None,
        "password": lambda v: str(v) or None,
        "aws_region": _aws_region,
        "aws_endpoint_url": _aws_endpoint_url,
    }
)
# (MIRROR_REGISTRY_<ID> suffix, RegistryConfig field), longest suffix first.
_REGISTRY_ENV = (
    ("_AWS_ENDPOINT_URL", "aws_endpoint_url"),
    ("_AWS_REGION", "aws_region"),
    ("_USERNAME", "username"),
    ("_PASSWORD", "password"),
    ("_URL", "url"),
)


def _shown(url: Any) -> str:
    """A rejected URL for an error message, unless it may carry a password (user:pass@)."""
    return repr(url) if not isinstance(url, str) or "@" not in url else "<a url with user info>"


def describe(config: Config) -> dict[str, Any]:
    """A loggable view of the config: credentials and tokens are never included."""
    out: dict[str, Any] = {}
    for section in ("server", "cache", "upstream", "warm"):
        obj = getattr(config, section)
        out[section] = {
            f.name: str(getattr(obj, f.name)) for f in fields(obj) if f.name not in ("admin_token",)
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
