"""Where everything lives under the cache directory (pure path arithmetic).

    <root>/
      blobs/sha256/<2 hex>/<64 hex>         layers, configs and manifests: exact bytes, once each
      manifests/sha256/<2 hex>/<64 hex>     media type of a manifest stored under blobs/
      tags/<registry>/<name...>/_tags/<tag> {"digest", "media_type", "size", "fetched_at"}
      tmp/                                  writes in progress; swept at start, never served
      partial/<64 hex>[.prefix]             a fill that was interrupted (a restart, an outage):
                                            its bytes, and how far from 0 they are contiguous;
                                            a later fill of that digest goes on from there
      index.sqlite                          last access per blob (rebuilt from the tree if lost)
      mirror.lock                           flock held by the one server using this directory

Every component is validated before it gets here: digests are 64 lowercase hex, names follow the
distribution grammar (no "..", no leading "_" so "_tags" cannot collide), tags cannot start
with "." and registries come from the config, so no path can leave the root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mirror.oci.digest import Digest, InvalidDigest, parse_digest


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    def partial_blob(self, digest: Digest) -> Path:
        return self.root / "partial" / digest.hex

    def partial_prefix(self, digest: Digest) -> Path:
        return self.root / "partial" / f"{digest.hex}.prefix"

    @property
    def lock(self) -> Path:
        return self.root / "mirror.lock"

    def blob(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_type(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    def tag(self, registry: str, name: str, tag: str) -> Path:
        return self.root / "tags" / registry / name / "_tags" / tag

    def digest_of(self, path: Path) -> Digest | None:
        """The digest a blob path stands for, or None for anything else (used by rebuilds)."""
        try:
            rel = path.relative_to(self.blobs).parts
        except ValueError:
            return None
        if len(rel) != 3 or rel[1] != rel[2][:2]:
            return None
        try:
            return parse_digest(f"{rel[0]}:{rel[2]}")
        except InvalidDigest:
            return None
