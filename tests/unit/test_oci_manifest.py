"""Reading manifests: index children by platform, image config + layers, and bad documents."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mirror.oci.digest import Digest
from mirror.oci.manifest import (
    Descriptor,
    InvalidManifest,
    ParsedManifest,
    choose_platform,
    normalize_platform,
    parse_manifest,
)
from mirror.oci.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_V1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
)

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64
D1, D2, D3 = (Digest("sha256", h) for h in (H1, H2, H3))
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"


def _desc(media_type: str, hex_: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": f"sha256:{hex_}", "size": size, **extra}


OCI_INDEX_DOC = {
    "schemaVersion": 2,
    "mediaType": OCI_INDEX,
    "manifests": [
        _desc(OCI_MANIFEST, H1, 100, platform={"os": "linux", "architecture": "amd64"}),
        _desc(
            OCI_MANIFEST,
            H2,
            200,
            platform={"os": "linux", "architecture": "arm64", "variant": "v8"},
        ),  # fmt: skip
        # buildx attestation manifests carry unknown/unknown; a missing platform is None
        _desc(OCI_MANIFEST, H3, 300, platform={"os": "unknown", "architecture": "unknown"}),
    ],
}
DOCKER_LIST_DOC = {
    "schemaVersion": 2,
    "mediaType": DOCKER_LIST,
    "manifests": [
        _desc(DOCKER_MANIFEST, H1, 10, platform={"os": "linux", "architecture": "amd64"}),
        _desc(
            DOCKER_MANIFEST,
            H2,
            20,
            platform={"os": "linux", "architecture": "arm", "variant": "v7"},
        ),
        _desc(DOCKER_MANIFEST, H3, 30),
    ],
}
OCI_IMAGE_DOC = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "config": _desc(OCI_CONFIG, H1, 1469),
    "layers": [_desc(OCI_LAYER, H2, 3623807), _desc(OCI_LAYER, H3, 0)],
}
DOCKER_IMAGE_DOC = {
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST,
    "config": _desc(DOCKER_CONFIG, H1, 7023),
    "layers": [_desc(DOCKER_LAYER, H2, 32654)],
}
V1_SIGNED_DOC = {
    "schemaVersion": 1,
    "name": "library/hello",
    "fsLayers": [{"blobSum": f"sha256:{H1}"}, {"blobSum": f"sha256:{H2}"}, "junk"],
}


@pytest.mark.parametrize(
    ("doc", "media_type", "expected"),
    [
        (
            OCI_INDEX_DOC, OCI_INDEX,
            ParsedManifest(OCI_INDEX, True, (
                Descriptor(OCI_MANIFEST, D1, 100, "linux/amd64"),
                Descriptor(OCI_MANIFEST, D2, 200, "linux/arm64/v8"),
                Descriptor(OCI_MANIFEST, D3, 300, "unknown/unknown"),
            )),
        ),
        (
            DOCKER_LIST_DOC, DOCKER_LIST,
            ParsedManifest(DOCKER_LIST, True, (
                Descriptor(DOCKER_MANIFEST, D1, 10, "linux/amd64"),
                Descriptor(DOCKER_MANIFEST, D2, 20, "linux/arm/v7"),
                Descriptor(DOCKER_MANIFEST, D3, 30, None),
            )),
        ),
        (
            OCI_IMAGE_DOC, OCI_MANIFEST,
            ParsedManifest(OCI_MANIFEST, False, (
                Descriptor(OCI_CONFIG, D1, 1469),
                Descriptor(OCI_LAYER, D2, 3623807),
                Descriptor(OCI_LAYER, D3, 0),
            )),
        ),
        (
            DOCKER_IMAGE_DOC, DOCKER_MANIFEST,
            ParsedManifest(DOCKER_MANIFEST, False, (
                Descriptor(DOCKER_CONFIG, D1, 7023),
                Descriptor(DOCKER_LAYER, D2, 32654),
            )),
        ),
        (
            V1_SIGNED_DOC, DOCKER_V1_SIGNED,
            ParsedManifest(DOCKER_V1_SIGNED, False, (
                Descriptor("", D1, -1), Descriptor("", D2, -1),
            )),
        ),
        # no Content-Type: the document's own mediaType decides
        (
            OCI_INDEX_DOC, "",
            ParsedManifest(OCI_INDEX, True, (
                Descriptor(OCI_MANIFEST, D1, 100, "linux/amd64"),
                Descriptor(OCI_MANIFEST, D2, 200, "linux/arm64/v8"),
                Descriptor(OCI_MANIFEST, D3, 300, "unknown/unknown"),
            )),
        ),
        # an index served as application/json is still an index: it has "manifests"
        (
            {"schemaVersion": 2, "manifests": [_desc(OCI_MANIFEST, H1, 1)]}, "application/json",
            ParsedManifest("application/json", True, (Descriptor(OCI_MANIFEST, D1, 1),)),
        ),
        # an artifact manifest without a config
        (
            {"schemaVersion": 2, "layers": [_desc(OCI_LAYER, H2, 5)]}, OCI_MANIFEST,
            ParsedManifest(OCI_MANIFEST, False, (Descriptor(OCI_LAYER, D2, 5),)),
        ),
        (
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, OCI_INDEX,
            ParsedManifest(OCI_INDEX, True, ()),
        ),
    ],
)  # fmt: skip
def test_parse_manifest(doc: dict[str, Any], media_type: str, expected: ParsedManifest) -> None:
    assert parse_manifest(json.dumps(doc).encode(), media_type) == expected


BAD_DIGEST = {"mediaType": OCI_LAYER, "digest": "sha256:nope", "size": 1}


@pytest.mark.parametrize(
    ("body", "media_type", "message"),
    [
        (b"", OCI_MANIFEST, "not JSON"),
        (b"{", OCI_MANIFEST, "not JSON"),
        (b"\xff\xfe", OCI_MANIFEST, "not JSON"),
        (b"[]", OCI_MANIFEST, "not a JSON object"),
        (b'"manifest"', OCI_MANIFEST, "not a JSON object"),
        (b"{}", OCI_INDEX, "no manifests list"),
        (b'{"manifests": {}}', OCI_INDEX, "no manifests list"),
        (b'{"manifests": null}', "", "no manifests list"),
        (b"{}", OCI_MANIFEST, "no layers list"),
        (b'{"config": {}}', DOCKER_MANIFEST, "no layers list"),
        (json.dumps({"manifests": ["x"]}).encode(), OCI_INDEX, "not an object"),
        (json.dumps({"manifests": [BAD_DIGEST]}).encode(), OCI_INDEX, "invalid digest"),
        (json.dumps({"layers": [BAD_DIGEST]}).encode(), OCI_MANIFEST, "invalid digest"),
        (
            json.dumps({"layers": [{"digest": "sha512:" + "a" * 128, "size": 1}]}).encode(),
            OCI_MANIFEST, "unsupported digest algorithm",
        ),
        (
            json.dumps({"layers": [{"digest": f"sha256:{H1}"}]}).encode(),
            OCI_MANIFEST, "no valid size",
        ),
        (
            json.dumps({"layers": [{"digest": f"sha256:{H1}", "size": -1}]}).encode(),
            OCI_MANIFEST, "no valid size",
        ),
        (
            json.dumps({"layers": [{"digest": f"sha256:{H1}", "size": "10"}]}).encode(),
            OCI_MANIFEST, "no valid size",
        ),
        (
            json.dumps({"config": "x", "layers": []}).encode(),
            OCI_MANIFEST, "not an object",
        ),
    ],
)  # fmt: skip
def test_parse_manifest_rejects(body: bytes, media_type: str, message: str) -> None:
    with pytest.raises(InvalidManifest, match=message):
        parse_manifest(body, media_type)


def test_parse_manifest_v1_bad_blobsum_is_invalid_manifest() -> None:
    body = json.dumps({"schemaVersion": 1, "fsLayers": [{"blobSum": "sha256:nope"}]}).encode()
    with pytest.raises(InvalidManifest):
        parse_manifest(body, DOCKER_V1_SIGNED)


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("linux/arm", ("linux", "arm", "v7")),
        ("linux/arm/7", ("linux", "arm", "v7")),
        ("linux/armhf", ("linux", "arm", "v7")),
        ("linux/armel", ("linux", "arm", "v6")),
        ("linux/arm/v6", ("linux", "arm", "v6")),
        ("linux/arm64", ("linux", "arm64", "")),
        ("linux/arm64/v8", ("linux", "arm64", "")),
        ("linux/aarch64", ("linux", "arm64", "")),
        ("linux/arm64/v9.0", ("linux", "arm64", "v9")),
        ("linux/amd64", ("linux", "amd64", "")),
        ("linux/amd64/v1", ("linux", "amd64", "")),
        ("linux/x86_64", ("linux", "amd64", "")),
        ("linux/amd64/v3", ("linux", "amd64", "v3")),
        ("linux/i386", ("linux", "386", "")),
        ("Linux/AMD64", ("linux", "amd64", "")),
        ("macos/arm64", ("darwin", "arm64", "")),
        ("linux/s390x", ("linux", "s390x", "")),
    ],
)
def test_normalize_platform_like_containerd(written: str, canonical: tuple[str, ...]) -> None:
    assert normalize_platform(written) == canonical


ARM_ALL = ["linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm64/v8", "linux/amd64"]


@pytest.mark.parametrize(
    ("wanted", "offered", "chosen"),
    [
        # one manifest per requested platform, the exact variant first
        ("linux/arm", ARM_ALL, "linux/arm/v7"),
        ("linux/arm/v7", ARM_ALL, "linux/arm/v7"),
        ("linux/arm/v6", ARM_ALL, "linux/arm/v6"),
        ("linux/arm", ["linux/arm/v6", "linux/arm"], "linux/arm"),  # no variant is v7
        ("linux/arm/v7", ["linux/arm/v5", "linux/arm/v6"], "linux/arm/v6"),  # best lower one
        ("linux/arm/v6", ["linux/arm/v7"], None),  # a v6 CPU cannot run v7
        ("linux/arm64", ARM_ALL, "linux/arm64/v8"),
        ("linux/arm64/v8", ["linux/arm64"], "linux/arm64"),
        ("linux/arm64", ["linux/arm/v6", "linux/arm/v7"], "linux/arm/v7"),  # 32-bit fallback
        ("linux/arm64/v8.2", ["linux/arm64/v8.1", "linux/arm64/v8"], "linux/arm64/v8.1"),
        ("linux/amd64", ARM_ALL, "linux/amd64"),
        ("linux/amd64", ["linux/amd64/v3", "linux/amd64/v1"], "linux/amd64/v1"),
        ("linux/amd64", ["linux/amd64/v3", "linux/amd64/v2"], None),  # a v1 CPU
        ("linux/amd64/v3", ["linux/amd64", "linux/amd64/v2"], "linux/amd64/v2"),
        ("linux/amd64", ["linux/386", "linux/arm64"], "linux/386"),
        ("linux/amd64", ["windows/amd64", "linux/arm64"], None),
        ("linux/amd64", ["unknown/unknown", None], None),
        ("linux/s390x", ARM_ALL, None),
    ],
)
def test_choose_platform_picks_what_a_node_of_that_platform_pulls(
    wanted: str, offered: list[str | None], chosen: str | None
) -> None:
    position = choose_platform(wanted, offered)
    assert (None if position is None else offered[position]) == chosen


def test_choose_platform_takes_the_first_of_equal_entries() -> None:
    offered = ["linux/amd64", "linux/arm/v7", "linux/arm", "linux/arm/7"]
    assert choose_platform("linux/arm", offered) == 1
