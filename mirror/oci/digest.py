"""Content digests: parsing and validation before any path is built from one."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Only sha256 is stored: it is what every registry in the wild uses, and a fixed-length
# lowercase hex name is what makes the on-disk layout safe to build from client input.
_SHA256 = re.compile(r"sha256:([a-f0-9]{64})")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


class InvalidDigest(ValueError):
    """The text is not a digest this mirror can serve."""


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(text: str) -> Digest:
    m = _SHA256.fullmatch(text)
    if m is None:
        if _ANY_DIGEST.fullmatch(text) and not text.startswith("sha256:"):
            raise InvalidDigest(f"unsupported digest algorithm in {text!r}: only sha256")
        raise InvalidDigest(f"invalid digest {text!r}")
    return Digest("sha256", m.group(1))


def looks_like_digest(text: str) -> bool:
    """A reference is a digest (not a tag) when it contains a colon: tags cannot."""
    return ":" in text


def digest_of(data: bytes) -> Digest:
    """The sha256 digest of some bytes (a manifest, as the mirror always computes it itself)."""
    return Digest("sha256", hashlib.sha256(data).hexdigest())
