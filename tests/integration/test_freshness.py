"""Tag freshness against a real upstream: revalidation by HEAD once the TTL is over, stale
answers while the upstream is down or rate limiting, and a cache that survives a restart."""

from __future__ import annotations

from collections import Counter

import pytest

from .clients import Containerd, Skopeo, host_platform
from .images import ACCEPT_ALL, Catalog
from .mirror_proc import Mirror, MirrorFactory
from .procs import http_request
from .upstream import Upstream

pytestmark = pytest.mark.integration


def ctr_pull_hello(containerd: Containerd, mirror: Mirror, catalog: Catalog) -> None:
    hosts = containerd.hosts_dir("docker.io", mirror=mirror.url)
    ref = catalog.hello.ref("docker.io")
    ns = containerd.namespace()
    containerd.pull(ref, hosts, ns)
    assert containerd.images(ns) == {ref: catalog.hello.digest}


def content_requests(upstream: Upstream) -> Counter[tuple[str, str]]:
    """Requests that are neither auth nor the ping: what actually costs upstream quota."""
    return Counter(
        (r.method, r.kind) for r in upstream.requests() if r.kind not in ("token", "ping")
    )


def test_cache_survives_restart(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, upstream: Upstream
) -> None:
    ctr_pull_hello(containerd, mirror, catalog)
    mirror.restart()  # same port, same cache directory
    upstream.reset()
    ctr_pull_hello(containerd, mirror, catalog)
    assert upstream.requests() == []


def test_expired_tag_is_revalidated_with_head_only(
    mirror_factory: MirrorFactory, catalog: Catalog, containerd: Containerd, upstream: Upstream
) -> None:
    """Docker Hub counts manifest GETs as pulls; a HEAD is free. After the TTL the mirror
    must ask with HEAD and, the digest being unchanged, fetch nothing else."""
    mirror = mirror_factory(tag_ttl="0s")
    ctr_pull_hello(containerd, mirror, catalog)
    upstream.reset()
    ctr_pull_hello(containerd, mirror, catalog)
    assert content_requests(upstream) == Counter({("HEAD", "manifest_tag"): 1}), [
        str(r) for r in upstream.requests()
    ]


def test_upstream_down_serves_cached_image(
    mirror_factory: MirrorFactory,
    catalog: Catalog,
    containerd: Containerd,
    skopeo: Skopeo,
    upstream: Upstream,
) -> None:
    mirror = mirror_factory(tag_ttl="0s")  # every tag request wants to revalidate
    ctr_pull_hello(containerd, mirror, catalog)
    upstream.stop()
    ctr_pull_hello(containerd, mirror, catalog)
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    arch = host_platform().split("/")[1]
    layout = skopeo.copy(conf, "docker.io/library/hello:1.0", arch=arch)
    assert layout.root_digest == catalog.hello.platform(host_platform()).digest


def test_upstream_rate_limit_serves_cached_image(
    mirror_factory: MirrorFactory, catalog: Catalog, containerd: Containerd, upstream: Upstream
) -> None:
    mirror = mirror_factory(tag_ttl="0s")
    ctr_pull_hello(containerd, mirror, catalog)
    upstream.set_faults(
        {"kind": "manifest_tag", "status": 429, "headers": {"Retry-After": "60"}},
    )
    ctr_pull_hello(containerd, mirror, catalog)
    # The mirror asked (and was refused), and did not hammer the upstream while refused.
    tag_requests = content_requests(upstream)[("HEAD", "manifest_tag")]
    assert 1 <= tag_requests <= 4, [str(r) for r in upstream.requests()]


def test_a_limit_on_manifest_gets_does_not_stop_blobs(
    mirror_factory: MirrorFactory, catalog: Catalog, containerd: Containerd, upstream: Upstream
) -> None:
    """Docker Hub counts manifest GETs as pulls. Once it answers one with 429, the mirror holds
    back manifest GETs only: a node pulling an image whose manifests the mirror holds (its
    layers not yet) revalidates the tag by HEAD and gets every layer."""
    mirror = mirror_factory(tag_ttl="0s")
    accept = [("Accept", t) for t in ACCEPT_ALL]
    base = "/v2/docker.io/library/hello/manifests"
    for ref in ("1.0", catalog.hello.platform(host_platform()).digest):
        assert http_request("GET", mirror.host, f"{base}/{ref}", accept).status == 200
    limit = {"status": 429, "method": "GET", "headers": {"Retry-After": "60"}}
    upstream.set_faults({**limit, "kind": "manifest_tag"}, {**limit, "kind": "manifest_digest"})
    held = http_request("GET", mirror.host, "/v2/docker.io/library/single/manifests/1.0", accept)
    assert (held.status, held.headers["Retry-After"]) == (503, "60")
    upstream.reset()

    ctr_pull_hello(containerd, mirror, catalog)
    counts = content_requests(upstream)
    assert counts[("HEAD", "manifest_tag")] == 1  # the revalidation went out, and succeeded
    assert counts[("GET", "blob")] >= 2  # config and layers: from the origin, not held
    assert not any(method == "GET" and "manifest" in kind for method, kind in counts)


def test_sigterm_exits_cleanly(mirror: Mirror) -> None:
    assert mirror.stop() == 0, mirror.process.log_tail()
