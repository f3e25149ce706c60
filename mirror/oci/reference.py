"""Repository names, tags and full image references, per the distribution spec's grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.oci.digest import Digest, InvalidDigest, parse_digest

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# A host is a DNS name (with a dot), localhost, or anything with a port; this is how
# docker and containerd tell "ghcr.io/org/app" from the Docker Hub user "org".
_HOST = re.compile(
    r"(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|\[[0-9a-fA-F:]+\]|[A-Za-z0-9-]+)(?::[0-9]+)?"
)
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class InvalidName(ValueError):
    """Not a valid repository name."""


class InvalidReference(ValueError):
    """Not a valid image reference."""


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise InvalidName(f"invalid repository name {name!r}")
    return name


def is_tag(text: str) -> bool:
    return _TAG.fullmatch(text) is not None


def looks_like_host(component: str) -> bool:
    """True when the first path component names a registry rather than a repository."""
    return (component == "localhost" or "." in component or ":" in component) and _HOST.fullmatch(
        component
    ) is not None


def canonical_registry(host: str) -> str:
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def normalize_name(registry: str, name: str) -> str:
    """Docker Hub's one-component names live under library/ (nginx -> library/nginx)."""
    if registry == DOCKER_HUB and "/" not in name:
        return f"library/{name}"
    return name


@dataclass(frozen=True, slots=True)
class ImageReference:
    registry: str
    name: str
    tag: str | None
    digest: Digest | None

    @property
    def reference(self) -> str:
        """What goes in /manifests/<reference>: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    def __str__(self) -> str:
        out = f"{self.registry}/{self.name}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_image_reference(text: str, default_registry: str = DOCKER_HUB) -> ImageReference:
    """`nginx`, `ghcr.io/org/app:1.0`, `host:5000/a/b@sha256:...` -> ImageReference."""
    text = text.strip()
    if not text or len(text) > 1024:
        raise InvalidReference(f"invalid image reference {text!r}")
    remainder, at, digest_text = text.partition("@")
    digest = None
    if at:
        try:
            digest = parse_digest(digest_text)
        except InvalidDigest as exc:
            raise InvalidReference(f"{text!r}: {exc}") from exc
    first, slash, rest = remainder.partition("/")
    if slash and looks_like_host(first):
        registry, path = canonical_registry(first), rest
    else:
        registry, path = default_registry, remainder
    name, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "")
    if colon and not is_tag(tag):
        raise InvalidReference(f"{text!r}: invalid tag {tag!r}")
    try:
        name = validate_name(normalize_name(registry, name))
    except InvalidName as exc:
        raise InvalidReference(f"{text!r}: {exc}") from exc
    if not colon and digest is None:
        tag = "latest"
    return ImageReference(registry, name, tag or None, digest)
