"""Reading what a manifest refers to: its media type, children by platform, and blobs."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
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


# containerd's canonical spellings (its platforms package, normalizeArch): what an index entry
# says and what an operator types are compared only after both went through this.
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}
_ARM64_VARIANTS = {"8": "", "v8": "", "v8.0": "", "9": "v9", "9.0": "v9", "v9.0": "v9"}
_ARM64_VARIANT = re.compile(r"v([89])(?:\.([0-9]))?")


def normalize_platform(platform: str) -> tuple[str, str, str]:
    """(os, architecture, variant) as containerd compares them: linux/arm is linux/arm/v7,
    linux/arm64/v8 is linux/arm64, linux/amd64/v1 is linux/amd64, armhf is arm/v7."""
    os_, _, rest = platform.lower().partition("/")
    arch, _, variant = rest.partition("/")
    os_ = "darwin" if os_ == "macos" else os_
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch == "386":
        variant = ""
    elif arch == "amd64" and variant == "v1":
        variant = ""
    elif arch == "arm64":
        variant = _ARM64_VARIANTS.get(variant, variant)
    elif arch in ("armhf", "armel"):
        arch, variant = "arm", "v7" if arch == "armhf" else "v6"
    elif arch == "arm" and variant in ("", "5", "6", "7", "8"):
        variant = "v" + (variant or "7")
    return os_, arch, variant


def _compatible(os_: str, arch: str, variant: str) -> list[tuple[str, str, str]]:
    """What a node of this (normalised) platform runs, best first: containerd's platformVector.
    amd64/vN also runs vN-1..v1 and 386; arm/vN runs down to v5; arm64 runs its lower
    versions and then arm/v8..v5."""
    found: list[tuple[str, str, str]] = []
    if arch == "amd64":
        level = int(variant[1:]) if re.fullmatch(r"v[0-9]+", variant) else 1
        found = [(os_, arch, variant)]
        found += [(os_, arch, f"v{n}") for n in range(level - 1, 0, -1)]
        found.append((os_, "386", ""))
    elif arch == "arm":
        found = [(os_, arch, variant)]
        if re.fullmatch(r"v[0-9]+", variant):
            found += [(os_, arch, f"v{n}") for n in range(int(variant[1:]) - 1, 4, -1)]
    elif arch == "arm64":
        m = _ARM64_VARIANT.fullmatch(variant or "v8")
        if m is None:
            return [(os_, arch, variant)]
        major, minor = int(m.group(1)), int(m.group(2) or 0)
        # an arm64/v9.x CPU also implements v8.(x+5) and below
        ladder = [(9, minor), (8, min(minor + 5, 9))] if major == 9 else [(8, minor)]
        found = [
            (os_, arch, f"v{mj}.{mn}" if mn else f"v{mj}")
            for mj, top in ladder
            for mn in range(top, -1, -1)
        ]
        found += _compatible(os_, "arm", "v8")
    else:
        found = [(os_, arch, variant)]
    return [normalize_platform("/".join(p).rstrip("/")) for p in found]


def choose_platform(wanted: str, offered: Sequence[str | None]) -> int | None:
    """The position in `offered` of the one entry a `wanted` node pulls, as containerd picks it:
    the most preferred compatible platform (exact variant first), the first such entry on a tie.
    None when the node could not pull any of them."""
    ranks: dict[tuple[str, str, str], int] = {}
    for preference, compatible in enumerate(_compatible(*normalize_platform(wanted))):
        ranks.setdefault(compatible, preference)
    best: tuple[int, int] | None = None
    for position, platform in enumerate(offered):
        rank = None if platform is None else ranks.get(normalize_platform(platform))
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, position)
    return None if best is None else best[1]


def same_platform(a: str, b: str) -> bool:
    """Whether two spellings name one platform once normalised (linux/arm == linux/arm/v7)."""
    return normalize_platform(a) == normalize_platform(b)
