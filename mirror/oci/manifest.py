"""Reading what a manifest refers to: its media type, children by platform, and blobs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mirror.oci.digest import Digest, InvalidDigest, parse_digest
from mirror.oci.mediatypes import DOCKER_V1, DOCKER_V1_SIGNED, INDEX_TYPES


class InvalidManifest(ValueError):
    """Bytes that cannot be read as a manifest."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: str | None = None  # "os/arch[/variant]" for index entries


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    is_index: bool
    children: tuple[Descriptor, ...]  # index: manifests; image: config + layers


def _descriptor(raw: Any) -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidManifest("descriptor is not an object")
    try:
        digest = parse_digest(str(raw.get("digest", "")))
    except InvalidDigest as exc:
        raise InvalidManifest(str(exc)) from exc
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(f"descriptor {digest} has no valid size")
    platform = None
    p = raw.get("platform")
    if isinstance(p, dict) and p.get("os") and p.get("architecture"):
        platform = f"{p['os']}/{p['architecture']}"
        if p.get("variant"):
            platform += f"/{p['variant']}"
    return Descriptor(str(raw.get("mediaType", "")), digest, size, platform)


def parse_manifest(body: bytes, media_type: str) -> ParsedManifest:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidManifest("manifest is not a JSON object")
    media_type = media_type or str(doc.get("mediaType", ""))
    if media_type in (DOCKER_V1, DOCKER_V1_SIGNED):
        layers = doc.get("fsLayers") or []
        try:
            children = tuple(
                Descriptor("", parse_digest(str(layer["blobSum"])), -1)
                for layer in layers
                if isinstance(layer, dict) and "blobSum" in layer
            )
        except InvalidDigest as exc:
            raise InvalidManifest(str(exc)) from exc
        return ParsedManifest(media_type, False, children)
    if media_type in INDEX_TYPES or "manifests" in doc:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidManifest("index has no manifests list")
        return ParsedManifest(media_type, True, tuple(_descriptor(e) for e in entries))
    config = doc.get("config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest("image manifest has no layers list")
    children = ((_descriptor(config),) if config is not None else ()) + tuple(
        _descriptor(layer) for layer in layers
    )
    return ParsedManifest(media_type, False, children)


def platform_matches(wanted: str, actual: str | None) -> bool:
    """linux/arm64 matches linux/arm64/v8; linux/arm/v7 needs the variant to match."""
    if actual is None:
        return False
    w = wanted.split("/")
    a = actual.split("/")
    if w[:2] != a[:2]:
        return False
    if len(w) < 3:
        return True
    # containerd's normalisation: arm64 without a variant is v8
    variant = a[2] if len(a) >= 3 else ("v8" if a[1] == "arm64" else "")
    return w[2] == variant
