"""Request paths: /v2/... into (kind, name, reference), and routing to a configured registry."""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from mirror.oci.reference import (
    canonical_registry,
    looks_like_host,
    normalize_name,
    validate_name,
)


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOAD = "upload"
    CATALOG = "catalog"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class V2Path:
    kind: Kind
    name: str = ""
    reference: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    registry: str
    name: str  # as the registry knows it (library/ added for Docker Hub)


class UnknownRegistry(LookupError):
    """The request names a registry this mirror is not configured for: it is not an open proxy."""

    def __init__(self, registry: str) -> None:
        self.registry = registry
        super().__init__(registry)


def parse_v2_path(tail: str) -> V2Path:
    """`tail` is what follows "/v2/" (no query string)."""
    if tail in ("", "/"):
        return V2Path(Kind.BASE)
    if tail.rstrip("/") == "_catalog":
        return V2Path(Kind.CATALOG)
    parts = tail.split("/")
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return V2Path(Kind.TAGS, "/".join(parts[:-2]))
    # .../blobs/uploads/ or .../blobs/uploads/<id>: an upload id never contains "/", so a
    # repository that is itself named org/blobs/uploads still routes by its trailing verb.
    for tail_len in (2, 3):
        i = len(parts) - tail_len
        if i > 0 and parts[i : i + 2] == ["blobs", "uploads"]:
            return V2Path(Kind.UPLOAD, "/".join(parts[:i]))
    if len(parts) >= 3 and parts[-1]:
        kinds = {"manifests": Kind.MANIFEST, "blobs": Kind.BLOB, "referrers": Kind.REFERRERS}
        kind = kinds.get(parts[-2])
        if kind is not None:
            return V2Path(kind, "/".join(parts[:-2]), parts[-1])
    return V2Path(Kind.UNKNOWN, tail)


def route(name: str, ns: str | None, registries: Container[str], default_registry: str) -> Target:
    """Pick the upstream registry for a request, in this order:

    1. a configured registry as the first name component (`/v2/ghcr.io/org/app/...`): how
       skopeo/podman/CRI-O mirrors and containerd's override_path name the registry;
    2. containerd's `?ns=<registry>` (sent percent-encoded, `127.0.0.1%3A5000`; `ns` is the
       value as the query parser decoded it, once: never decoded again here), with the whole
       name as the repository: `my.group/project` is a repository there, not a registry;
    3. a first component that looks like a registry host but is not configured: refused, so
       the mirror is no open proxy;
    4. the default registry (Docker Engine's registry-mirrors, plain clients).
    Host names are case-insensitive. Raises UnknownRegistry for a registry that is not
    configured, InvalidName for a bad name.
    """
    first, slash, rest = name.partition("/")
    prefix = _host(first) if slash and looks_like_host(first) else None
    if prefix is not None and prefix in registries:
        registry, name = prefix, rest
    elif ns:
        registry = _host(ns.strip())
    elif prefix is not None:
        raise UnknownRegistry(prefix)
    else:
        registry = default_registry
    if registry not in registries:
        raise UnknownRegistry(registry)
    return Target(registry, validate_name(normalize_name(registry, name)))


def _host(text: str) -> str:
    return canonical_registry(text.lower())


_LINK = re.compile(r"<([^>]*)>((?:\s*;\s*[^;,]*)*)")
_REL = re.compile(r';\s*rel\s*=\s*"?([^";]*)"?', re.IGNORECASE)


def next_page_link(header: str | None, path: str, ns: str | None) -> str | None:
    """A registry's tag list `Link: <...>; rel="next"`, rewritten to point at the mirror:
    `path` is this request's own (encoded) path, registry prefix and all, `ns` is kept, and
    the registry's `last` and `n` carry over. None when there is no next page we can follow:
    a link without `last` would lead the client back to the first page, forever."""
    for link in _LINK.finditer(header or ""):
        rel = _REL.search(link.group(2))
        if rel is None or "next" not in rel.group(1).lower().split():
            continue
        query = [
            (key, value)
            for key, value in parse_qsl(urlsplit(link.group(1)).query, keep_blank_values=True)
            if key in ("last", "n")
        ]
        if not any(key == "last" for key, _ in query):
            return None
        if ns:
            query.insert(0, ("ns", ns))
        return f'<{path}?{urlencode(query, quote_via=quote)}>; rel="next"'
    return None
