"""On-disk layout: every path stays under the root, and blob paths map back to digests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.oci.digest import Digest, parse_digest
from mirror.oci.reference import is_tag, validate_name
from mirror.storage.layout import Layout

ROOT = Path("/var/cache/mirror")
LAYOUT = Layout(ROOT)
HEX = "a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
DIGEST = Digest("sha256", HEX)


def _inside(path: Path, root: Path) -> bool:
    real = Path(os.path.normpath(path))
    return real == root or root in real.parents


def test_fixed_places() -> None:
    assert LAYOUT.blobs == ROOT / "blobs"
    assert LAYOUT.tmp == ROOT / "tmp"
    assert LAYOUT.lock == ROOT / "mirror.lock"  # beside blobs/, never scanned as one


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("blob", f"blobs/sha256/a3/{HEX}"),
        ("manifest_type", f"manifests/sha256/a3/{HEX}"),
    ],
)
def test_digest_paths(method: str, expected: str) -> None:
    assert getattr(LAYOUT, method)(DIGEST) == ROOT / expected


@pytest.mark.parametrize(
    ("registry", "name", "tag", "expected"),
    [
        ("docker.io", "library/nginx", "latest", "tags/docker.io/library/nginx/_tags/latest"),
        ("ghcr.io", "org/team/app", "v1.2", "tags/ghcr.io/org/team/app/_tags/v1.2"),
        ("127.0.0.1:5000", "a", "_x", "tags/127.0.0.1:5000/a/_tags/_x"),
    ],
)
def test_tag_path(registry: str, name: str, tag: str, expected: str) -> None:
    assert LAYOUT.tag(registry, name, tag) == ROOT / expected


# Only values that passed the oci validators reach the layout; whatever they are, the
# resulting paths must stay inside the root and inside their own subtree.
VALID_NAMES = ["a", "library/nginx", "a.b/c-d/e__f", "x" * 255]
VALID_TAGS = ["latest", "v1.0", "_", "a" * 128, "x.."]
VALID_DIGESTS = [f"sha256:{h}" for h in (HEX, "0" * 64, "f" * 64)]


@pytest.mark.parametrize("name", VALID_NAMES)
@pytest.mark.parametrize("tag", VALID_TAGS)
def test_tag_paths_stay_under_their_subtree(name: str, tag: str) -> None:
    validate_name(name)
    assert is_tag(tag)
    path = LAYOUT.tag("docker.io", name, tag)
    assert _inside(path, ROOT / "tags" / "docker.io")
    assert path.name == tag
    assert path.parent.name == "_tags"


@pytest.mark.parametrize("text", VALID_DIGESTS)
def test_digest_paths_stay_under_their_subtree(text: str) -> None:
    digest = parse_digest(text)
    assert _inside(LAYOUT.blob(digest), LAYOUT.blobs)
    assert _inside(LAYOUT.manifest_type(digest), ROOT / "manifests")


@pytest.mark.parametrize("text", VALID_DIGESTS)
def test_digest_of_round_trips(text: str) -> None:
    digest = parse_digest(text)
    assert LAYOUT.digest_of(LAYOUT.blob(digest)) == digest


@pytest.mark.parametrize(
    "path",
    [
        ROOT,
        ROOT / "blobs",
        ROOT / "blobs" / "sha256",
        ROOT / "blobs" / "sha256" / "a3",
        ROOT / "blobs" / "sha256" / "ff" / HEX,  # fan-out dir does not match
        ROOT / "blobs" / "sha256" / "a3" / HEX[:-1],
        ROOT / "blobs" / "sha256" / "a3" / (HEX + ".tmp"),
        ROOT / "blobs" / "sha256" / "a3" / HEX / "extra",
        ROOT / "manifests" / "sha256" / "a3" / HEX,
        ROOT / "tmp" / HEX,
        Path("/elsewhere/blobs/sha256/a3") / HEX,
        Path("blobs/sha256/a3") / HEX,  # relative: not under the root
    ],
)
def test_digest_of_anything_else_is_none(path: Path) -> None:
    assert LAYOUT.digest_of(path) is None


@pytest.mark.parametrize(
    "path",
    [
        ROOT / "blobs" / "sha256" / "zz" / ("z" * 64),
        ROOT / "blobs" / "sha256" / "A3" / HEX.upper(),
        ROOT / "blobs" / "md5" / "a3" / HEX,
    ],
)
def test_digest_of_rejects_what_parse_digest_rejects(path: Path) -> None:
    assert LAYOUT.digest_of(path) is None
