"""Tag freshness against a real upstream: revalidation by HEAD once the TTL is over, stale
answers while the upstream is down or rate limiting, and a cache that survives a restart."""

from __future__ import annotations

from collections import Counter

import pytest

from .clients import Containerd, Skopeo, host_platform
from .images import Catalog
from .mirror_proc import Mirror, MirrorFactory
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


def test_sigterm_exits_cleanly(mirror: Mirror) -> None:
    assert mirror.stop() == 0, mirror.process.log_tail()
