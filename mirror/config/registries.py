"""The [registries] table: which registries exist, where they are, how the mirror signs in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from mirror.config.values import is_loopback, optional_str, parse_bool

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


def load_registries(
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


def aws_endpoint_url(value: Any, why: str = "the reply carries the registry password") -> str:
    """An AWS API endpoint: https only, because what travels there is secret (`why` says
    what: GetAuthorizationToken's reply is the registry password). Plain http is for a
    stand-in (moto) on this machine, where nothing travels over a network."""
    url = _registry_url(value)
    if url.startswith("http://") and not is_loopback(urlsplit(url).hostname or ""):
        raise ValueError(
            f"must be https:// ({why}), got {url!r}; "
            "http:// only to a loopback host (127.0.0.0/8, ::1, localhost)"
        )
    return url


def aws_region(value: Any) -> str:
    if not isinstance(value, str) or not _AWS_REGION.fullmatch(value):
        raise ValueError(f"expected an AWS region like us-east-1, got {value!r}")
    return value


_REGISTRY_PARSERS: Mapping[str, Any] = MappingProxyType(
    {
        "url": _registry_url,
        "is_mirror": parse_bool,
        "username": lambda v: str(v) or None,
        "password": lambda v: str(v) or None,
        "aws_region": aws_region,
        "aws_endpoint_url": aws_endpoint_url,
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
