"""Repository names, tags, registry hosts and full image references."""

from __future__ import annotations

import pytest

from mirror.oci.digest import Digest
from mirror.oci.reference import (
    MAX_NAME_LENGTH,
    ImageReference,
    InvalidName,
    InvalidReference,
    canonical_registry,
    is_tag,
    looks_like_host,
    normalize_name,
    parse_image_reference,
    validate_name,
)

HEX = "a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "nginx",
        "library/nginx",
        "org/team/app",
        "a-b",
        "a--b",
        "a_b",
        "a__b",
        "a.b",
        "0",
        "my-org/my.app_v2",
        "a" * MAX_NAME_LENGTH,
    ],
)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Nginx",
        "library/Nginx",
        "/nginx",
        "nginx/",
        "a//b",
        "a..b",
        "../etc",
        "a/../b",
        ".a",
        "-a",
        "a-",
        "_a",
        "a___b",
        "a_.b",
        "_tags",
        "a/_tags",
        "a b",
        "a:b",
        "a@b",
        "a\\b",
        "a" * (MAX_NAME_LENGTH + 1),
    ],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("latest", True),
        ("v1.2.3", True),
        ("1.25-alpine", True),
        ("_internal", True),
        ("UPPER_case", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (".hidden", False),
        ("-flag", False),
        ("a:b", False),
        ("a/b", False),
        ("a b", False),
        ("a+b", False),
        ("..", False),
    ],
)
def test_is_tag(text: str, expected: bool) -> None:
    assert is_tag(text) is expected


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("ghcr.io", True),
        ("registry.k8s.io", True),
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("myregistry:5000", True),
        ("[::1]:5000", True),
        ("Registry.Example.COM", True),
        ("library", False),
        ("nginx", False),
        ("my-org", False),
        ("", False),
        ("host:", False),
        ("host:port", False),
        ("my_host.io", False),
        (".io", False),
        ("ghcr.io.", False),
    ],
)
def test_looks_like_host(component: str, expected: bool) -> None:
    assert looks_like_host(component) is expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
    ],
)
def test_canonical_registry(host: str, expected: str) -> None:
    assert canonical_registry(host) == expected


@pytest.mark.parametrize(
    ("registry", "name", "expected"),
    [
        ("docker.io", "nginx", "library/nginx"),
        ("docker.io", "library/nginx", "library/nginx"),
        ("docker.io", "bitnami/redis", "bitnami/redis"),
        ("ghcr.io", "app", "app"),
        ("quay.io", "org/app", "org/app"),
    ],
)
def test_normalize_name(registry: str, name: str, expected: str) -> None:
    assert normalize_name(registry, name) == expected


# text -> (registry, name, tag, digest hex or None, str(), .reference)
GOOD_REFERENCES = [
    ("nginx", ("docker.io", "library/nginx", "latest", None)),
    ("  nginx  ", ("docker.io", "library/nginx", "latest", None)),
    ("nginx:1.25", ("docker.io", "library/nginx", "1.25", None)),
    ("library/nginx:1.25-alpine", ("docker.io", "library/nginx", "1.25-alpine", None)),
    ("bitnami/redis", ("docker.io", "bitnami/redis", "latest", None)),
    ("docker.io/nginx", ("docker.io", "library/nginx", "latest", None)),
    ("index.docker.io/library/nginx:1", ("docker.io", "library/nginx", "1", None)),
    ("registry-1.docker.io/user/app", ("docker.io", "user/app", "latest", None)),
    ("ghcr.io/org/app:1.0", ("ghcr.io", "org/app", "1.0", None)),
    ("ghcr.io/app", ("ghcr.io", "app", "latest", None)),
    ("registry.k8s.io/pause:3.9", ("registry.k8s.io", "pause", "3.9", None)),
    ("localhost/foo", ("localhost", "foo", "latest", None)),
    ("localhost:5000/a/b", ("localhost:5000", "a/b", "latest", None)),
    ("host:5000/a/b:v2", ("host:5000", "a/b", "v2", None)),
    ("127.0.0.1:5000/a/b@" + DIGEST, ("127.0.0.1:5000", "a/b", None, HEX)),
    ("nginx@" + DIGEST, ("docker.io", "library/nginx", None, HEX)),
    ("ghcr.io/org/app:1.0@" + DIGEST, ("ghcr.io", "org/app", "1.0", HEX)),
    # no slash: "host:5000" is a Docker Hub image with tag 5000, as docker reads it
    ("host:5000", ("docker.io", "library/host", "5000", None)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_REFERENCES)
def test_parse_image_reference(
    text: str, expected: tuple[str, str, str | None, str | None]
) -> None:
    registry, name, tag, hex_ = expected
    digest = Digest("sha256", hex_) if hex_ else None
    assert parse_image_reference(text) == ImageReference(registry, name, tag, digest)


@pytest.mark.parametrize(
    ("text", "default_registry", "expected"),
    [
        ("app", "ghcr.io", ImageReference("ghcr.io", "app", "latest", None)),
        ("org/app:1", "quay.io", ImageReference("quay.io", "org/app", "1", None)),
        ("nginx", "docker.io", ImageReference("docker.io", "library/nginx", "latest", None)),
        # a host in the text wins over the default
        (
            "docker.io/nginx",
            "ghcr.io",
            ImageReference("docker.io", "library/nginx", "latest", None),
        ),
    ],
)
def test_parse_image_reference_default_registry(
    text: str, default_registry: str, expected: ImageReference
) -> None:
    assert parse_image_reference(text, default_registry) == expected


@pytest.mark.parametrize(
    ("text", "as_string", "reference"),
    [
        ("nginx", "docker.io/library/nginx:latest", "latest"),
        ("ghcr.io/org/app:1.0", "ghcr.io/org/app:1.0", "1.0"),
        ("a/b@" + DIGEST, f"docker.io/a/b@{DIGEST}", DIGEST),
        ("a/b:t@" + DIGEST, f"docker.io/a/b:t@{DIGEST}", DIGEST),  # pinned: digest wins
    ],
)
def test_image_reference_str_and_reference(text: str, as_string: str, reference: str) -> None:
    ref = parse_image_reference(text)
    assert str(ref) == as_string
    assert ref.reference == reference


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Nginx",
        "nginx:",
        "nginx:-bad",
        "nginx:.bad",
        "nginx:" + "a" * 129,
        "nginx@",
        "nginx@sha256:short",
        "nginx@sha256:" + HEX.upper(),
        "nginx@md5:d41d8cd98f00b204e9800998ecf8427e",
        "ghcr.io/",
        "ghcr.io//app",
        "ghcr.io/Org/app",
        "a/../b",
        "a" * 1025,
        "registry.example.com/" + "a" * 256,
    ],
)
def test_parse_image_reference_rejects(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_image_reference(text)
