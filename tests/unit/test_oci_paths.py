"""/v2/ request paths into (kind, name, reference), and routing them to a configured registry."""

from __future__ import annotations

import pytest

from mirror.oci.paths import (
    Kind,
    Target,
    UnknownRegistry,
    V2Path,
    next_page_link,
    parse_v2_path,
    route,
)
from mirror.oci.reference import InvalidName

DIGEST = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("", V2Path(Kind.BASE)),
        ("/", V2Path(Kind.BASE)),
        ("_catalog", V2Path(Kind.CATALOG)),
        ("_catalog/", V2Path(Kind.CATALOG)),
        ("nginx/manifests/latest", V2Path(Kind.MANIFEST, "nginx", "latest")),
        ("library/nginx/manifests/1.25", V2Path(Kind.MANIFEST, "library/nginx", "1.25")),
        (f"library/nginx/manifests/{DIGEST}", V2Path(Kind.MANIFEST, "library/nginx", DIGEST)),
        ("ghcr.io/org/app/manifests/v1", V2Path(Kind.MANIFEST, "ghcr.io/org/app", "v1")),
        (f"library/nginx/blobs/{DIGEST}", V2Path(Kind.BLOB, "library/nginx", DIGEST)),
        (f"a/referrers/{DIGEST}", V2Path(Kind.REFERRERS, "a", DIGEST)),
        ("library/nginx/tags/list", V2Path(Kind.TAGS, "library/nginx")),
        ("a/b/c/tags/list", V2Path(Kind.TAGS, "a/b/c")),
        ("library/nginx/blobs/uploads/", V2Path(Kind.UPLOAD, "library/nginx")),
        ("library/nginx/blobs/uploads", V2Path(Kind.UPLOAD, "library/nginx")),
        ("library/nginx/blobs/uploads/1f2e-uuid", V2Path(Kind.UPLOAD, "library/nginx")),
        # repositories whose names contain the route words still parse by position
        ("blobs/manifests/latest", V2Path(Kind.MANIFEST, "blobs", "latest")),
        ("manifests/manifests/latest", V2Path(Kind.MANIFEST, "manifests", "latest")),
        ("tags/tags/list", V2Path(Kind.TAGS, "tags")),
        ("a/tags/manifests/list", V2Path(Kind.MANIFEST, "a/tags", "list")),
        # not a route: too short, empty reference, unknown verb
        ("manifests/latest", V2Path(Kind.UNKNOWN, "manifests/latest")),
        ("nginx/manifests/", V2Path(Kind.UNKNOWN, "nginx/manifests/")),
        ("nginx/blobs/", V2Path(Kind.UNKNOWN, "nginx/blobs/")),
        ("tags/list", V2Path(Kind.UNKNOWN, "tags/list")),
        ("nginx/layers/x", V2Path(Kind.UNKNOWN, "nginx/layers/x")),
        ("nginx", V2Path(Kind.UNKNOWN, "nginx")),
    ],
)
def test_parse_v2_path(tail: str, expected: V2Path) -> None:
    assert parse_v2_path(tail) == expected


def test_parse_v2_path_repository_named_blobs_uploads() -> None:
    # "org/blobs/uploads" is a valid repository name; an upload id cannot contain "/".
    assert parse_v2_path("org/blobs/uploads/manifests/latest") == V2Path(
        Kind.MANIFEST, "org/blobs/uploads", "latest"
    )


REGISTRIES = frozenset({"docker.io", "ghcr.io", "quay.io", "127.0.0.1:5000", "localhost:5000"})


@pytest.mark.parametrize(
    ("name", "ns", "default", "expected"),
    [
        # default registry, Docker Hub's library/ prefix
        ("nginx", None, "docker.io", Target("docker.io", "library/nginx")),
        ("library/nginx", None, "docker.io", Target("docker.io", "library/nginx")),
        ("bitnami/redis", None, "docker.io", Target("docker.io", "bitnami/redis")),
        ("app", None, "ghcr.io", Target("ghcr.io", "app")),
        # registry as the first path component (skopeo/podman, containerd override_path)
        ("ghcr.io/org/app", None, "docker.io", Target("ghcr.io", "org/app")),
        ("ghcr.io/app", None, "docker.io", Target("ghcr.io", "app")),
        ("docker.io/nginx", None, "ghcr.io", Target("docker.io", "library/nginx")),
        ("index.docker.io/nginx", None, "ghcr.io", Target("docker.io", "library/nginx")),
        ("registry-1.docker.io/a/b", None, "ghcr.io", Target("docker.io", "a/b")),
        ("127.0.0.1:5000/a/b", None, "docker.io", Target("127.0.0.1:5000", "a/b")),
        ("localhost:5000/x", None, "docker.io", Target("localhost:5000", "x")),
        # a configured registry in the path wins over ?ns=
        ("ghcr.io/org/app", "quay.io", "docker.io", Target("ghcr.io", "org/app")),
        ("127.0.0.1:5000/a/b", "ghcr.io", "docker.io", Target("127.0.0.1:5000", "a/b")),
        # ...but a host-like first component that is not configured is part of the
        # repository name when ?ns= names the registry (containerd sends the whole name)
        (
            "my.group/project",
            "127.0.0.1:5000",
            "docker.io",
            Target("127.0.0.1:5000", "my.group/project"),
        ),
        ("evil.example.com/x", "ghcr.io", "docker.io", Target("ghcr.io", "evil.example.com/x")),
        ("localhost/x", "quay.io", "docker.io", Target("quay.io", "localhost/x")),
        ("a.b/c/d", "docker.io", "ghcr.io", Target("docker.io", "a.b/c/d")),
        # host names are case-insensitive, in the path and in ?ns=
        ("GHCR.IO/org/app", None, "docker.io", Target("ghcr.io", "org/app")),
        ("Docker.IO/nginx", None, "ghcr.io", Target("docker.io", "library/nginx")),
        ("LocalHost:5000/x", None, "docker.io", Target("localhost:5000", "x")),
        ("org/app", "GHCR.io", "docker.io", Target("ghcr.io", "org/app")),
        ("nginx", "Index.Docker.IO", "ghcr.io", Target("docker.io", "library/nginx")),
        ("a/b", "LOCALHOST:5000", "docker.io", Target("localhost:5000", "a/b")),
        # containerd's ?ns=, as the query parser decoded it
        ("org/app", "ghcr.io", "docker.io", Target("ghcr.io", "org/app")),
        ("nginx", "docker.io", "ghcr.io", Target("docker.io", "library/nginx")),
        ("nginx", "index.docker.io", "ghcr.io", Target("docker.io", "library/nginx")),
        ("nginx", "registry-1.docker.io", "ghcr.io", Target("docker.io", "library/nginx")),
        ("a/b", "127.0.0.1:5000", "docker.io", Target("127.0.0.1:5000", "a/b")),
        ("a/b", " quay.io ", "docker.io", Target("quay.io", "a/b")),
        ("a/b", "", "quay.io", Target("quay.io", "a/b")),  # empty ns: the default
    ],
)
def test_route(name: str, ns: str | None, default: str, expected: Target) -> None:
    assert route(name, ns, REGISTRIES, default) == expected


@pytest.mark.parametrize(
    ("name", "ns", "default", "registry"),
    [
        ("evil.example.com/x", None, "docker.io", "evil.example.com"),
        ("ghcr.io:443/org/app", None, "docker.io", "ghcr.io:443"),
        ("localhost/x", None, "docker.io", "localhost"),
        ("my.group/project", None, "docker.io", "my.group"),  # no ns: not an open proxy
        ("Evil.Example.COM/x", None, "docker.io", "evil.example.com"),
        ("x", "Evil.Example.COM", "docker.io", "evil.example.com"),
        ("x", "evil.example.com", "docker.io", "evil.example.com"),
        ("x", "127.0.0.1:5001", "docker.io", "127.0.0.1:5001"),
        # ns is decoded once, by the query parser: what is still encoded stays so
        ("x", "127.0.0.1%3A5000", "docker.io", "127.0.0.1%3a5000"),
        ("x", None, "registry.k8s.io", "registry.k8s.io"),
    ],
)
def test_route_unknown_registry(name: str, ns: str | None, default: str, registry: str) -> None:
    with pytest.raises(UnknownRegistry) as info:
        route(name, ns, REGISTRIES, default)
    assert info.value.registry == registry


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("", None),
        ("Nginx", None),
        ("ghcr.io/", None),
        ("ghcr.io/Org/app", None),
        ("a//b", None),
        ("a/../b", None),
        ("_tags", "ghcr.io"),
        ("a/b/", "ghcr.io"),
        ("a" * 256, "ghcr.io"),
        ("a" * 250, None),  # library/ pushes it past 255
    ],
)
def test_route_invalid_name(name: str, ns: str | None) -> None:
    with pytest.raises(InvalidName):
        route(name, ns, REGISTRIES, "docker.io")


TAGS = "/v2/docker.io/library/nginx/tags/list"


@pytest.mark.parametrize(
    ("header", "path", "ns", "expected"),
    [
        # Distribution: a relative link to its own path
        ('</v2/library/nginx/tags/list?last=1.25&n=100>; rel="next"', TAGS, None,
         f'<{TAGS}?last=1.25&n=100>; rel="next"'),
        # absolute, unquoted rel, parameters in another order: the mirror's path all the same
        ("<https://ghcr.io/v2/org/app/tags/list?n=2&last=v1>; rel=next",
         "/v2/org/app/tags/list", None, '</v2/org/app/tags/list?n=2&last=v1>; rel="next"'),
        # containerd's ns is kept, percent-encoded
        ('</v2/org/app/tags/list?last=b&n=1>; rel="next"', "/v2/org/app/tags/list",
         "127.0.0.1:5000", '</v2/org/app/tags/list?ns=127.0.0.1%3A5000&last=b&n=1>; rel="next"'),
        # anything else the registry put in the query stays with the registry
        ('</v2/a/tags/list?last=b&n=1&cursor=x&ns=evil.example>; rel="next"', "/v2/a/tags/list",
         None, '</v2/a/tags/list?last=b&n=1>; rel="next"'),
        # several links: the next one is picked
        ('</v2/a/tags/list?last=a>; rel="prev", </v2/a/tags/list?last=z>; rel="next"',
         "/v2/a/tags/list", None, '</v2/a/tags/list?last=z>; rel="next"'),
        ('</v2/a/tags/list?last=z>; title="x"; REL="Next"', "/v2/a/tags/list", None,
         '</v2/a/tags/list?last=z>; rel="next"'),
        # no next page, or one that would loop back to the first page
        (None, TAGS, None, None),
        ("", TAGS, None, None),
        ('</v2/a/tags/list?last=a>; rel="prev"', TAGS, None, None),
        ('</v2/a/tags/list?n=5>; rel="next"', TAGS, None, None),
        ('</v2/a/tags/list?cursor=abc>; rel="next"', TAGS, None, None),
        ("garbage", TAGS, None, None),
        ('</v2/a/tags/list?last=b>', TAGS, None, None),  # no rel at all
    ],
)  # fmt: skip
def test_next_page_link(
    header: str | None, path: str, ns: str | None, expected: str | None
) -> None:
    assert next_page_link(header, path, ns) == expected
