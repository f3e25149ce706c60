"""Warm jobs as the API shows them: per-image state, progress and timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mirror.oci.manifest import Descriptor
from mirror.oci.reference import ImageReference

QUEUED, RESOLVING, FETCHING, DONE, FAILED = "queued", "resolving", "fetching", "done", "failed"
RUNNING = "running"  # a job's state while any of its images is not finished


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(slots=True)
class ImageStatus:
    image: str  # as submitted
    reference: ImageReference
    state: str = QUEUED
    reason: str | None = None
    digest: str | None = None  # what the tag resolved to (an index, for multi-arch images)
    platforms: list[str] = field(default_factory=list)  # index entries chosen
    missing_platforms: list[str] = field(default_factory=list)  # requested, not in the index
    notes: list[str] = field(default_factory=list)  # warnings for an image that still got done
    bytes_done: int = 0
    bytes_total: int = 0
    blobs_done: int = 0
    blobs_total: int = 0
    blobs_cached: int = 0  # of blobs_done, those already in the cache
    started: float | None = None
    finished: float | None = None
    bytes_finished: int = field(default=0, repr=False)  # blobs fetched completely
    in_flight: dict[str, Descriptor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "reference": str(self.reference),
            "state": self.state,
            "reason": self.reason,
            "digest": self.digest,
            "platforms": self.platforms,
            "missing_platforms": self.missing_platforms,
            "notes": self.notes,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "blobs_done": self.blobs_done,
            "blobs_total": self.blobs_total,
            "blobs_cached": self.blobs_cached,
            "started": _iso(self.started),
            "finished": _iso(self.finished),
        }


@dataclass(slots=True)
class Job:
    id: str
    images: list[ImageStatus]
    platforms: tuple[str, ...]
    created: float
    state: str = QUEUED  # queued | running | done | failed (some image failed)
    started: float | None = None
    finished: float | None = None

    def to_json(self, with_images: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "platforms": list(self.platforms),
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "images_total": len(self.images),
            "images_done": sum(i.state == DONE for i in self.images),
            "images_failed": sum(i.state == FAILED for i in self.images),
            "bytes_done": sum(i.bytes_done for i in self.images),
            "bytes_total": sum(i.bytes_total for i in self.images),
            "blobs_done": sum(i.blobs_done for i in self.images),
            "blobs_total": sum(i.blobs_total for i in self.images),
        }
        if with_images:
            out["images"] = [i.to_json() for i in self.images]
        return out
