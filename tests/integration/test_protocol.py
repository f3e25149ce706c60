"""The mirror's answers at the HTTP level against the real upstream: ranges, errors, the
read-only surface and upstream credentials."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from .images import ACCEPT_ALL, Catalog, sha256
from .mirror_proc import Mirror, MirrorFactory, RegistryEntry
from .procs import Response, http_request
from .upstream import Upstream

pytestmark = pytest.mark.integration

ACCEPT = [("Accept", t) for t in ACCEPT_ALL]


def error_codes(resp: Response) -> list[str]:
    return [e["code"] for e in json.loads(resp.body)["errors"]]


def ns(upstream: Upstream) -> str:
    return f"ns={quote(upstream.host, safe='')}"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "cached"])
def test_blob_range_request(
    mirror: Mirror, catalog: Catalog, upstream: Upstream, warm: bool
) -> None:
    """containerd resumes a cut body with `Range: bytes=N-` and wants 206 + Content-Range
    (a 200 with the whole body also works, so both are accepted, but the bytes must fit)."""
    layer = catalog.hello.platform("linux/amd64").layers[-1]
    path = f"/v2/library/hello/blobs/{layer}?{ns(upstream)}"
    full = http_request("GET", upstream.registry_host, f"/v2/library/hello/blobs/{layer}").body
    if warm:
        assert sha256(http_request("GET", mirror.host, path).body) == layer
    resp = http_request("GET", mirror.host, path, [("Range", "bytes=1000-")])
    if resp.status == 206:
        assert resp.header("Content-Range") == f"bytes 1000-{len(full) - 1}/{len(full)}"
        assert resp.body == full[1000:]
    else:
        assert resp.status == 200, resp.body[:300]
        assert resp.body == full


def test_unknown_tag_and_blob_are_404(mirror: Mirror, upstream: Upstream) -> None:
    tag = http_request(
        "GET", mirror.host, f"/v2/library/hello/manifests/nope?{ns(upstream)}", ACCEPT
    )
    assert tag.status == 404
    assert error_codes(tag) == ["MANIFEST_UNKNOWN"]
    missing = sha256(b"not in the registry")
    blob = http_request("GET", mirror.host, f"/v2/library/hello/blobs/{missing}?{ns(upstream)}")
    assert blob.status == 404
    assert error_codes(blob) == ["BLOB_UNKNOWN"]
    head = http_request("HEAD", mirror.host, f"/v2/library/hello/blobs/{missing}?{ns(upstream)}")
    assert head.status == 404
    assert head.body == b""


@pytest.mark.parametrize(
    "ref", ["sha256:1234", "sha256:" + "G" * 64, "md5:d41d8cd98f00b204e9800998ecf8427e"]
)
def test_invalid_digest_is_a_client_error(mirror: Mirror, upstream: Upstream, ref: str) -> None:
    resp = http_request("GET", mirror.host, f"/v2/library/hello/blobs/{ref}?{ns(upstream)}")
    assert resp.status in (400, 404), (resp.status, resp.body)
    assert upstream.requests() == []


def test_push_is_refused(mirror: Mirror, upstream: Upstream) -> None:
    for method, path in (
        ("POST", "/v2/library/hello/blobs/uploads/"),
        ("PUT", "/v2/library/hello/manifests/1.0"),
        ("DELETE", "/v2/library/hello/manifests/1.0"),
    ):
        resp = http_request(method, mirror.host, f"{path}?{ns(upstream)}", body=b"{}")
        assert resp.status == 405, (method, path, resp.status, resp.body)
        assert error_codes(resp) == ["UNSUPPORTED"]
    assert upstream.requests() == []


def test_private_repository_with_credentials(
    mirror_factory: MirrorFactory, catalog: Catalog, upstream: Upstream
) -> None:
    """Configured credentials go to the token endpoint; the client needs none."""
    entry = RegistryEntry(upstream.url, upstream.username, upstream.password)
    mirror = mirror_factory(registries={upstream.host: entry})
    path = f"/v2/private/single/manifests/1.0?{ns(upstream)}"
    resp = http_request("GET", mirror.host, path, ACCEPT)
    assert resp.status == 200, resp.body
    assert resp.body == catalog.private.raw
    # Credentials never end up in the mirror's log.
    assert upstream.password not in mirror.process.log_path.read_text()


def test_private_repository_without_credentials_fails_fast(
    mirror: Mirror, upstream: Upstream
) -> None:
    """Anonymous tokens lack the scope: a quick 403 DENIED (never a 401, which would make
    containerd send the node's credentials), not a hang or a 500."""
    resp = http_request(
        "GET", mirror.host, f"/v2/private/single/manifests/1.0?{ns(upstream)}", ACCEPT, timeout=5
    )
    assert resp.status == 403, (resp.status, resp.body)
    assert error_codes(resp) == ["DENIED"]
