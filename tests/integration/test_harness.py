"""The harness itself, proven against the upstream without a mirror: if these fail, the
mirror tests' verdicts mean nothing."""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections import Counter

import pytest

from .clients import Containerd, Skopeo, host_platform
from .images import ACCEPT_ALL, Catalog, sha256
from .procs import http_request
from .upstream import Upstream

pytestmark = pytest.mark.integration


def bearer_token(upstream: Upstream, scope: str, basic: str | None = None) -> str:
    """Follow the challenge the way a client does; returns the token."""
    headers = [("Authorization", f"Basic {basic}")] if basic else []
    resp = http_request(
        "GET", upstream.host, f"/token?service=registry.test&scope={scope}", headers
    )
    assert resp.status == 200, resp.body
    return str(json.loads(resp.body)["token"])


def test_upstream_challenges_like_docker_hub(upstream: Upstream, catalog: Catalog) -> None:
    ping = http_request("GET", upstream.host, "/v2/")
    assert ping.status == 401
    assert ping.header("WWW-Authenticate") == (
        f'Bearer realm="http://{upstream.host}/token",service="registry.test"'
    )
    path = "/v2/library/hello/manifests/1.0"
    denied = http_request("HEAD", upstream.host, path)
    assert denied.status == 401
    assert 'scope="repository:library/hello:pull"' in (denied.header("WWW-Authenticate") or "")

    token = bearer_token(upstream, "repository:library/hello:pull")
    auth = [("Authorization", f"Bearer {token}")] + [("Accept", t) for t in ACCEPT_ALL]
    head = http_request("HEAD", upstream.host, path, auth)
    assert head.status == 200
    assert head.header("Docker-Content-Digest") == catalog.hello.digest
    assert head.header("Content-Length") == str(len(catalog.hello.raw))
    got = http_request("GET", upstream.host, path, auth)
    assert got.body == catalog.hello.raw
    assert got.header("Content-Type") == catalog.hello.media_type
    # A token for one repository does not open another.
    other = http_request("HEAD", upstream.host, "/v2/library/single/manifests/1.0", auth)
    assert other.status == 401

    assert [(r.method, r.kind, r.status) for r in upstream.requests()] == [
        ("GET", "ping", 401),
        ("HEAD", "manifest_tag", 401),
        ("GET", "token", 200),
        ("HEAD", "manifest_tag", 200),
        ("GET", "manifest_tag", 200),
        ("HEAD", "manifest_tag", 401),
    ]
    upstream.reset()
    assert upstream.requests() == []


def test_private_repository_needs_credentials(upstream: Upstream, catalog: Catalog) -> None:
    path = f"/v2/private/single/manifests/{catalog.private.digest}"
    anonymous = bearer_token(upstream, "repository:private/single:pull")
    resp = http_request("GET", upstream.host, path, [("Authorization", f"Bearer {anonymous}")])
    assert resp.status == 401
    basic = base64.b64encode(f"{upstream.username}:{upstream.password}".encode()).decode()
    token = bearer_token(upstream, "repository:private/single:pull", basic)
    resp = http_request(
        "GET",
        upstream.host,
        path,
        [("Authorization", f"Bearer {token}"), ("Accept", catalog.private.media_type)],
    )
    assert resp.status == 200
    assert sha256(resp.body) == catalog.private.digest
    wrong = base64.b64encode(b"puller:wrong").decode()
    bad = http_request(
        "GET",
        upstream.host,
        "/token?scope=repository:private/single:pull",
        [("Authorization", f"Basic {wrong}")],
    )
    assert bad.status == 401


def test_upstream_stop_and_start(upstream: Upstream) -> None:
    upstream.stop()
    with pytest.raises(ConnectionRefusedError):
        http_request("GET", upstream.host, "/v2/", timeout=2)
    upstream.start()
    assert http_request("GET", upstream.host, "/v2/").status == 401
    assert upstream.counts(challenges=True) == Counter({("GET", "ping"): 1})


def test_fault_injection(upstream: Upstream, catalog: Catalog) -> None:
    upstream.set_faults(
        {"kind": "manifest_tag", "status": 429, "times": 1, "headers": {"Retry-After": "1"}}
    )
    token = bearer_token(upstream, "repository:library/hello:pull")
    auth = [("Authorization", f"Bearer {token}"), ("Accept", catalog.hello.media_type)]
    first = http_request("GET", upstream.host, "/v2/library/hello/manifests/1.0", auth)
    assert first.status == 429
    assert first.header("Retry-After") == "1"
    second = http_request("GET", upstream.host, "/v2/library/hello/manifests/1.0", auth)
    assert second.status == 200


def test_skopeo_pulls_from_upstream_with_token_auth(
    upstream: Upstream, catalog: Catalog, skopeo: Skopeo
) -> None:
    conf = skopeo.registries_conf("docker.io", location=upstream.host)
    layout = skopeo.copy(conf, "docker.io/library/hello:1.0", all_platforms=True)
    assert layout.root_digest == catalog.hello.digest
    assert catalog.hello.all_blobs <= set(layout.blobs)
    counts = upstream.counts()
    assert counts[("GET", "token")] >= 1
    assert counts[("GET", "blob")] == len(catalog.hello.all_blobs)


def test_ctr_pulls_from_upstream_with_token_auth(
    upstream: Upstream, catalog: Catalog, containerd: Containerd
) -> None:
    hosts = containerd.hosts_dir(upstream.host, mirror=None, server=upstream.url)
    ns = containerd.namespace()
    ref = catalog.hello.ref(upstream.host)
    containerd.pull(ref, hosts, ns)
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    wanted = catalog.hello.platform(host_platform())
    assert {catalog.hello.digest, wanted.digest, *wanted.blobs} <= containerd.content(ns)
    assert upstream.counts()[("GET", "blob")] == len(wanted.blobs)
    # A pull in a new namespace fetches again: tests see real downloads, not containerd's cache.
    upstream.reset()
    containerd.pull(ref, hosts, containerd.namespace())
    assert upstream.counts()[("GET", "blob")] == len(wanted.blobs)


def test_fault_cut_and_corrupt_bodies(upstream: Upstream, catalog: Catalog) -> None:
    layer = catalog.single.platform("linux/amd64").layers[0]
    path = f"/v2/library/single/blobs/{layer}"
    token = bearer_token(upstream, "repository:library/single:pull")
    auth = [("Authorization", f"Bearer {token}")]

    upstream.set_faults({"action": "cut", "kind": "blob", "after": 1000, "times": 1})
    with pytest.raises(http.client.IncompleteRead) as cut:
        http_request("GET", upstream.host, path, auth)
    assert len(cut.value.partial) == 1000

    upstream.set_faults({"action": "corrupt", "kind": "blob", "times": 1})
    corrupt = http_request("GET", upstream.host, path, auth)
    assert corrupt.status == 200
    assert corrupt.header("Content-Length") == str(len(corrupt.body))
    assert sha256(corrupt.body) != layer

    intact = http_request("GET", upstream.host, path, auth)
    assert sha256(intact.body) == layer


def test_fault_throttle(upstream: Upstream, catalog: Catalog) -> None:
    """A throttled body arrives whole and correct, only slowly: ~256 KiB at 1 MiB/s."""
    layer = catalog.single.platform("linux/amd64").layers[0]
    path = f"/v2/library/single/blobs/{layer}"
    auth = [("Authorization", f"Bearer {bearer_token(upstream, 'repository:library/single:pull')}")]
    upstream.set_faults({"action": "throttle", "kind": "blob", "rate": 1024 * 1024, "times": 1})
    started = time.monotonic()
    slow = http_request("GET", upstream.host, path, auth)
    elapsed = time.monotonic() - started
    assert sha256(slow.body) == layer
    assert elapsed >= 0.9 * len(slow.body) / (1024 * 1024), elapsed
