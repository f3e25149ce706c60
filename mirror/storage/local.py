"""The local level as the app uses it: followable blob writes, manifests and tags, a probe."""

from __future__ import annotations

from typing import Protocol

from mirror.storage.blobstore import LocalStore
from mirror.storage.metastore import ManifestStore, TagStore


class CacheStore(LocalStore, ManifestStore, TagStore, Protocol):
    async def writable(self) -> bool:
        """Can a file be created now (readiness: a read-only or vanished volume is not)."""
        ...
