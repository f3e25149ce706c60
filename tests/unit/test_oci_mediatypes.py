"""Accept negotiation for manifests."""

from __future__ import annotations

import pytest

from mirror.oci.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    UPSTREAM_ACCEPT,
    accepted_types,
    is_acceptable,
)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], set()),
        ([""], set()),
        ([" , ,"], set()),
        ([OCI_MANIFEST], {OCI_MANIFEST}),
        # repeated headers (containerd sends one per type)
        ([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST], {OCI_INDEX, OCI_MANIFEST, DOCKER_LIST}),
        # comma-joined (docker, skopeo)
        (
            [f"{DOCKER_MANIFEST}, {DOCKER_LIST},{OCI_MANIFEST}"],
            {DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST},
        ),
        # both at once, with duplicates
        ([f"{OCI_INDEX}, {OCI_MANIFEST}", OCI_INDEX], {OCI_INDEX, OCI_MANIFEST}),
        # parameters dropped, case folded, blanks trimmed
        ([f"{OCI_MANIFEST}; q=0.5, */*;q=0.1"], {OCI_MANIFEST, "*/*"}),
        (["  Application/VND.OCI.Image.Manifest.v1+JSON  "], {OCI_MANIFEST}),
        (["application/json;charset=utf-8"], {"application/json"}),
    ],
)
def test_accepted_types(headers: list[str], expected: set[str]) -> None:
    assert accepted_types(headers) == frozenset(expected)


def test_accepted_types_takes_any_iterable() -> None:
    assert accepted_types(iter([OCI_INDEX])) == {OCI_INDEX}


@pytest.mark.parametrize(
    ("media_type", "headers", "expected"),
    [
        (OCI_MANIFEST, [], True),  # no Accept: anything goes
        (DOCKER_LIST, ["*/*"], True),
        (DOCKER_LIST, [f"{OCI_MANIFEST}, */*;q=0.1"], True),
        (OCI_MANIFEST, [OCI_MANIFEST], True),
        (OCI_INDEX, [OCI_MANIFEST, OCI_INDEX], True),
        ("Application/Vnd.Oci.Image.Index.v1+Json", [OCI_INDEX], True),
        (OCI_INDEX, [OCI_MANIFEST], False),
        (DOCKER_LIST, [f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"], False),
        (OCI_MANIFEST, ["application/json"], False),
    ],
)
def test_is_acceptable(media_type: str, headers: list[str], expected: bool) -> None:
    assert is_acceptable(media_type, accepted_types(headers)) is expected


def test_upstream_accept_names_every_manifest_type_and_a_wildcard() -> None:
    assert accepted_types([UPSTREAM_ACCEPT]) == {*MANIFEST_TYPES, "*/*"}
    assert INDEX_TYPES == {OCI_INDEX, DOCKER_LIST}
