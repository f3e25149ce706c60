"""What a level keeps besides blob bytes: manifests with their media type; what tags point at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mirror.oci.digest import Digest


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    media_type: str
    size: int
    fetched_at: float  # wall clock: it must survive restarts


class ManifestStore(Protocol):
    async def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """(body, media type), or None when not stored."""
        ...

    async def write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        """Raises OSError when it cannot be written (the caller decides if that matters)."""
        ...


class TagStore(Protocol):
    """Each replica's own: a tag is revalidated by a HEAD, which costs the origin nothing."""

    async def read_tag(self, registry: str, name: str, tag: str) -> TagRecord | None: ...

    async def write_tag(self, registry: str, name: str, tag: str, record: TagRecord) -> None: ...
