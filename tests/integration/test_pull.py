"""Pull-through core with real clients: skopeo and containerd pull through the mirror from a
token-protected Distribution registry, get exactly what was pushed, and a second pull
costs the upstream nothing.

Every client config points the primary/fallback at a dead port, so a pull can only succeed
if the mirror served it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from .clients import Containerd, Layout, Skopeo, host_platform
from .images import ACCEPT_ALL, Catalog, Image, sha256
from .mirror_proc import Mirror, MirrorFactory
from .procs import http_request
from .upstream import Upstream

pytestmark = pytest.mark.integration

HELLO = "library/hello"


def assert_same_image(layout: Layout, image: Image, platforms: list[str]) -> None:
    """The copy holds the upstream's exact manifest bytes and every blob of `platforms`."""
    assert layout.blobs[image.digest] == image.raw, "root manifest bytes differ from upstream"
    for p in platforms:
        manifest = image.platform(p)
        assert layout.blobs[manifest.digest] == manifest.raw, f"{p} manifest differs"
        missing = set(manifest.blobs) - set(layout.blobs)
        assert not missing, f"{p}: blobs missing from the copy: {missing}"


def assert_upstream_fetched(upstream: Upstream, blobs: int, manifests: int | None = None) -> None:
    """The first pull went to the upstream, for each needed blob exactly once and (when
    given) with `manifests` manifest GETs: Docker Hub counts each answered one as a pull."""
    answered = upstream.counts()
    seen = "upstream saw:\n" + "\n".join(map(str, upstream.requests()))
    assert answered[("GET", "blob")] == blobs, seen
    if manifests is not None:
        got = answered[("GET", "manifest_tag")] + answered[("GET", "manifest_digest")]
        assert got == manifests, seen


def assert_no_upstream_requests(upstream: Upstream) -> None:
    requests = upstream.requests()
    assert requests == [], "upstream saw:\n" + "\n".join(map(str, requests))


# ----- skopeo: registry path prefix ----------------------------------------------------


def test_skopeo_copy_all_platforms_via_path_prefix(
    mirror: Mirror, catalog: Catalog, skopeo: Skopeo, upstream: Upstream
) -> None:
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    layout = skopeo.copy(conf, f"docker.io/{HELLO}:1.0", all_platforms=True)
    assert layout.root_digest == catalog.hello.digest
    assert_same_image(layout, catalog.hello, ["linux/amd64", "linux/arm64"])
    assert_upstream_fetched(upstream, len(catalog.hello.all_blobs), manifests=3)


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_skopeo_copy_one_platform_via_path_prefix(
    mirror: Mirror, catalog: Catalog, skopeo: Skopeo, upstream: Upstream, arch: str
) -> None:
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    layout = skopeo.copy(conf, f"docker.io/{HELLO}:1.0", arch=arch)
    wanted = catalog.hello.platform(f"linux/{arch}")
    # Without --all skopeo stores the platform's manifest as the root, bytes unchanged.
    assert layout.root_digest == wanted.digest
    assert layout.blobs[wanted.digest] == wanted.raw
    assert set(wanted.blobs) <= set(layout.blobs)
    assert_upstream_fetched(upstream, len(wanted.blobs), manifests=2)


def test_skopeo_copy_docker_manifest_list(mirror: Mirror, catalog: Catalog, skopeo: Skopeo) -> None:
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    layout = skopeo.copy(conf, f"docker.io/{HELLO}:docker", all_platforms=True, transport="dir")
    assert layout.root_digest == catalog.hello_docker.digest
    assert layout.root_media_type == catalog.hello_docker.media_type
    assert_same_image(layout, catalog.hello_docker, ["linux/amd64", "linux/arm64"])


def test_skopeo_inspect_raw_matches_upstream(
    mirror: Mirror, catalog: Catalog, skopeo: Skopeo
) -> None:
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    assert skopeo.inspect_raw(conf, f"docker.io/{HELLO}:1.0") == catalog.hello.raw
    assert skopeo.inspect_raw(conf, "docker.io/library/single:1.0") == catalog.single.raw


# ----- containerd: ?ns= ----------------------------------------------------------------


@pytest.mark.parametrize("platform", [None, "linux/arm64"], ids=["default-platform", "arm64"])
@pytest.mark.parametrize("registry", ["docker.io", "hostport"])
def test_ctr_pull_via_ns(
    mirror: Mirror,
    catalog: Catalog,
    containerd: Containerd,
    upstream: Upstream,
    registry: str,
    platform: str | None,
) -> None:
    # "hostport" (127.0.0.1:<port>) makes containerd send ns=127.0.0.1%3A<port>, percent-encoded.
    name = upstream.host if registry == "hostport" else "docker.io"
    hosts = containerd.hosts_dir(name, mirror=mirror.url)
    ref = catalog.hello.ref(name)
    ns = containerd.namespace()
    containerd.pull(ref, hosts, ns, platform)
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    wanted = catalog.hello.platform(platform or host_platform())
    # ctr verified every digest while writing, so presence means the bytes were right.
    content = containerd.content(ns)
    assert {catalog.hello.digest, wanted.digest, *wanted.blobs} <= content
    assert_upstream_fetched(upstream, len(wanted.blobs), manifests=2)


@pytest.mark.parametrize("image", ["hello_docker", "single"])
def test_ctr_pull_other_manifest_types(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, image: str
) -> None:
    pushed: Image = getattr(catalog, image)
    hosts = containerd.hosts_dir("docker.io", mirror=mirror.url)
    ref = pushed.ref("docker.io")
    ns = containerd.namespace()
    containerd.pull(ref, hosts, ns)
    assert containerd.images(ns) == {ref: pushed.digest}
    wanted = pushed.platform(host_platform())
    assert {pushed.digest, wanted.digest, *wanted.blobs} <= containerd.content(ns)


def test_ctr_pull_with_override_path(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, upstream: Upstream
) -> None:
    """hosts.toml `override_path = true` with /v2/docker.io: prefix and ns arrive together."""
    hosts = containerd.hosts_dir(
        "docker.io", mirror=f"{mirror.url}/v2/docker.io", override_path=True
    )
    ref = catalog.hello.ref("docker.io")
    ns = containerd.namespace()
    containerd.pull(ref, hosts, ns)
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    assert_upstream_fetched(upstream, len(catalog.hello.platform(host_platform()).blobs))


def test_ctr_pull_docker_hub_short_name(
    mirror: Mirror, catalog: Catalog, containerd: Containerd
) -> None:
    """ctr does not normalise `docker.io/hello` (it asks for /v2/hello/...?ns=docker.io);
    the mirror adds library/ for Docker Hub's one-component names."""
    hosts = containerd.hosts_dir("docker.io", mirror=mirror.url)
    ref = "docker.io/hello:1.0"
    ns = containerd.namespace()
    containerd.pull(ref, hosts, ns)
    assert containerd.images(ns) == {ref: catalog.hello.digest}


# ----- plain root path: the default registry -------------------------------------------


def test_root_path_plain_http_uses_default_registry(mirror: Mirror, catalog: Catalog) -> None:
    """No ns and no prefix: Docker-Engine-style requests go to default_registry."""
    path = f"/v2/{HELLO}/manifests/1.0"
    accept = [("Accept", t) for t in ACCEPT_ALL]
    got = http_request("GET", mirror.host, path, accept)
    assert got.status == 200, got.body
    assert got.body == catalog.hello.raw
    assert got.header("Content-Type") == catalog.hello.media_type
    assert got.header("Docker-Content-Digest") == catalog.hello.digest


def test_root_path_skopeo_mirror_without_prefix(
    mirror: Mirror, catalog: Catalog, skopeo: Skopeo
) -> None:
    conf = skopeo.registries_conf("docker.io", mirror=mirror.host)
    layout = skopeo.copy(conf, f"docker.io/{HELLO}:1.0", all_platforms=True)
    assert layout.root_digest == catalog.hello.digest
    assert_same_image(layout, catalog.hello, ["linux/amd64", "linux/arm64"])


def test_root_path_with_docker_io_as_default(
    mirror_factory: MirrorFactory, catalog: Catalog, skopeo: Skopeo, upstream: Upstream
) -> None:
    mirror = mirror_factory(default_registry="docker.io")
    conf = skopeo.registries_conf("docker.io", mirror=mirror.host)
    layout = skopeo.copy(conf, "docker.io/library/single:1.0")
    assert layout.root_digest == catalog.single.digest
    assert all(r.repository in (None, "library/single") for r in upstream.requests())


# ----- the protocol, request by request, for each way of naming the registry -----------


def routed(style: str, upstream: Upstream, path: str) -> str:
    """`path` (/v2/<name>/...) as the mirror gets it with the given routing style."""
    if style == "ns":
        return f"{path}?ns={quote(upstream.host, safe='')}"
    if style == "prefix":
        return path.replace("/v2/", "/v2/docker.io/", 1)
    return path


@pytest.mark.parametrize("style", ["ns", "prefix", "root"])
def test_manifest_and_blob_responses(
    mirror: Mirror, catalog: Catalog, upstream: Upstream, style: str
) -> None:
    image = catalog.hello
    accept = [("Accept", ", ".join([*ACCEPT_ALL, "*/*"]))]  # containerd's single header

    head = http_request(
        "HEAD", mirror.host, routed(style, upstream, f"/v2/{HELLO}/manifests/1.0"), accept
    )
    assert head.status == 200
    assert head.header("Docker-Content-Digest") == image.digest
    assert head.header("Content-Type") == image.media_type
    assert head.header("Content-Length") == str(len(image.raw))

    child = image.platform("linux/arm64")
    by_digest = http_request(
        "GET",
        mirror.host,
        routed(style, upstream, f"/v2/{HELLO}/manifests/{child.digest}"),
        [("Accept", f"{child.media_type}, */*")],
    )
    assert by_digest.status == 200
    assert by_digest.body == child.raw
    assert by_digest.header("Content-Type") == child.media_type
    assert by_digest.header("Docker-Content-Digest") == child.digest

    layer = child.layers[-1]
    blob = http_request(
        "GET",
        mirror.host,
        routed(style, upstream, f"/v2/{HELLO}/blobs/{layer}"),
        [("Accept-Encoding", "gzip")],
    )
    assert blob.status == 200
    assert sha256(blob.body) == layer
    assert blob.header("Content-Length") == str(len(blob.body))
    assert blob.header("Content-Encoding") is None

    blob_head = http_request(
        "HEAD", mirror.host, routed(style, upstream, f"/v2/{HELLO}/blobs/{layer}")
    )
    assert blob_head.status == 200
    assert blob_head.header("Content-Length") == str(len(blob.body))


def test_unconfigured_registry_is_refused(mirror: Mirror, upstream: Upstream) -> None:
    """Not an open proxy: a registry missing from the config is never contacted."""
    for path in (
        f"/v2/{HELLO}/manifests/1.0?ns=registry.example.com",
        f"/v2/registry.example.com/{HELLO}/manifests/1.0?ns=registry.example.com",
    ):
        resp = http_request("GET", mirror.host, path, [("Accept", t) for t in ACCEPT_ALL])
        assert resp.status == 403, (path, resp.status, resp.body)
        assert json.loads(resp.body)["errors"][0]["code"] == "DENIED", path
    assert_no_upstream_requests(upstream)


def test_concurrent_cold_pulls_fetch_each_blob_once(
    mirror: Mirror,
    catalog: Catalog,
    containerd: Containerd,
    skopeo: Skopeo,
    upstream: Upstream,
) -> None:
    """Two ctr pulls and two skopeo copies of one uncached image at once: the upstream
    sends every blob once. Slow upstream blobs make sure the pulls really overlap."""
    upstream.set_faults({"action": "delay", "kind": "blob", "seconds": 0.3})
    hosts = containerd.hosts_dir("docker.io", mirror=mirror.url)
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    ref = catalog.hello.ref("docker.io")
    with ThreadPoolExecutor(4) as pool:
        ctr_pulls = [pool.submit(containerd.pull, ref, hosts, containerd.namespace()) for _ in "ab"]
        copies = [
            pool.submit(skopeo.copy, conf, f"docker.io/{HELLO}:1.0", all_platforms=True)
            for _ in "ab"
        ]
        for pull in ctr_pulls:
            pull.result()
        for copy in copies:
            assert_same_image(copy.result(), catalog.hello, ["linux/amd64", "linux/arm64"])
    assert_upstream_fetched(upstream, len(catalog.hello.all_blobs))


# ----- second pull: served from the cache, upstream untouched --------------------------


def test_second_ctr_pull_makes_no_upstream_requests(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, upstream: Upstream
) -> None:
    hosts = containerd.hosts_dir("docker.io", mirror=mirror.url)
    ref = catalog.hello.ref("docker.io")
    containerd.pull(ref, hosts, containerd.namespace())
    assert_upstream_fetched(upstream, len(catalog.hello.platform(host_platform()).blobs))

    upstream.reset()
    ns = containerd.namespace()  # empty namespace: containerd must fetch everything again
    containerd.pull(ref, hosts, ns)
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    # tag_ttl is 5m: not even a revalidating HEAD is due yet.
    assert_no_upstream_requests(upstream)


def test_second_skopeo_copy_makes_no_upstream_requests(
    mirror: Mirror, catalog: Catalog, skopeo: Skopeo, upstream: Upstream
) -> None:
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    skopeo.copy(conf, f"docker.io/{HELLO}:1.0", all_platforms=True)
    upstream.reset()
    layout = skopeo.copy(conf, f"docker.io/{HELLO}:1.0", all_platforms=True)
    assert_same_image(layout, catalog.hello, ["linux/amd64", "linux/arm64"])
    assert_no_upstream_requests(upstream)


def test_content_cached_for_one_client_serves_the_other(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, skopeo: Skopeo, upstream: Upstream
) -> None:
    """containerd HEADs the tag with one Accept header, skopeo GETs it with six: one cached
    manifest must serve both without asking upstream again."""
    hosts = containerd.hosts_dir("docker.io", mirror=mirror.url)
    containerd.pull(catalog.hello.ref("docker.io"), hosts, containerd.namespace())
    upstream.reset()
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    arch = host_platform().split("/")[1]
    layout = skopeo.copy(conf, f"docker.io/{HELLO}:1.0", arch=arch)
    assert layout.root_digest == catalog.hello.platform(host_platform()).digest
    assert_no_upstream_requests(upstream)
