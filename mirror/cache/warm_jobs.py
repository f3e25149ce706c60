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
    blobs_cached: int = 0  # of blobs_done, those already in the cache
    started: float | None = None
    finished: float | None = None
    # Per distinct blob (digest hex): its size (0 until known, for schema 1) and the bytes of it
    # done so far. A job adds these up across its images, so a blob two images share is
    # counted once in the job's totals while each image still shows all of its own.
    blob_sizes: dict[str, int] = field(default_factory=dict, repr=False)
    blob_bytes: dict[str, int] = field(default_factory=dict, repr=False)
    blobs_fetched: set[str] = field(default_factory=set, repr=False)
    in_flight: dict[str, Descriptor] = field(default_factory=dict, repr=False)

    @property
    def bytes_done(self) -> int:
        return sum(self.blob_bytes.values())

    @property
    def bytes_total(self) -> int:
        return sum(self.blob_sizes.values())

    @property
    def blobs_done(self) -> int:
        return len(self.blobs_fetched)

    @property
    def blobs_total(self) -> int:
        return len(self.blob_sizes)

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
            **self.distinct_blobs(),
        }
        if with_images:
            out["images"] = [i.to_json() for i in self.images]
        return out

    def distinct_blobs(self) -> dict[str, int]:
        """Bytes and blobs, done and total, each blob once however many images share it."""
        sizes: dict[str, int] = {}
        done: dict[str, int] = {}
        fetched: set[str] = set()
        for image in self.images:
            for blob, size in image.blob_sizes.items():
                sizes[blob] = max(sizes.get(blob, 0), size)
            for blob, part in image.blob_bytes.items():
                done[blob] = max(done.get(blob, 0), part)
            fetched |= image.blobs_fetched
        return {
            "bytes_done": sum(done.values()),
            "bytes_total": sum(sizes.values()),
            "blobs_done": len(fetched),
            "blobs_total": len(sizes),
        }
