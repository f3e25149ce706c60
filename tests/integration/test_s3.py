"""The S3 level with real processes and clients: moto's S3 server, Distribution behind its
token shim as the origin, skopeo and containerd. A second replica on an empty disk serves an
image with no blob byte from the origin; in redirect mode the clients follow the 307 to
moto's presigned URL, with the right digests, and the mirror itself sends next to nothing."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from component.moto import MotoServer
from prometheus_client.parser import text_string_to_metric_families

from .clients import Containerd, Layout, Skopeo, host_platform
from .images import Catalog
from .mirror_proc import Mirror, MirrorFactory
from .procs import http_request, wait_until
from .upstream import Upstream

pytestmark = pytest.mark.integration

AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIDTESTING", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    name = f"mirror-{secrets.token_hex(4)}"
    resp = http_request("PUT", moto_server.url.removeprefix("http://"), f"/{name}")
    assert resp.status == 200, resp.body
    return name


def s3_settings(moto: MotoServer, bucket: str, **more: Any) -> dict[str, Any]:
    return {
        "s3__bucket": bucket, "s3__region": "us-east-1", "s3__endpoint_url": moto.url,
        **{f"s3__{k}": v for k, v in more.items()},
    }  # fmt: skip


def metric(mirror: Mirror, name: str, **labels: str) -> float:
    """A sample from the mirror's own /metrics, as Prometheus would scrape it."""
    body = http_request("GET", mirror.host, "/metrics").body.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def assert_one_platform(layout: Layout, catalog: Catalog) -> None:
    """skopeo copied the linux/amd64 image, every blob hashing to its digest."""
    wanted = catalog.hello.platform("linux/amd64")
    assert layout.blobs[wanted.digest] == wanted.raw
    assert set(wanted.blobs) <= set(layout.blobs)


def uploads_settled(mirror: Mirror, count: int) -> None:
    wait_until(
        lambda: (
            metric(mirror, "mirror_s3_uploads_total", result="done")
            + metric(mirror, "mirror_s3_uploads_total", result="skipped")
            >= count
        ),
        timeout=30,
        what=f"{count} uploads to the bucket",
    )


def test_a_second_replica_pulls_from_the_bucket_not_the_origin(
    mirror_factory: MirrorFactory,
    upstream: Upstream,
    catalog: Catalog,
    skopeo: Skopeo,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    settings = s3_settings(moto_server, bucket)
    first = mirror_factory(env=AWS_ENV, **settings)
    src = "docker.io/library/hello:1.0"  # the mirror knows the upstream as docker.io too
    conf = skopeo.registries_conf("docker.io", mirror=f"{first.host}/docker.io")
    skopeo.copy(conf, src, arch="amd64")
    wanted = catalog.hello.platform("linux/amd64")
    uploads_settled(first, len(wanted.blobs))

    upstream.reset()
    second = mirror_factory(env=AWS_ENV, **settings)  # an empty disk, the same bucket
    conf = skopeo.registries_conf("docker.io", mirror=f"{second.host}/docker.io")
    layout = skopeo.copy(conf, src, arch="amd64")
    assert_one_platform(layout, catalog)
    assert upstream.blob_bytes() == 0
    assert upstream.counts()[("GET", "blob")] == 0


def test_redirects_send_skopeo_and_ctr_to_the_bucket(
    mirror_factory: MirrorFactory,
    upstream: Upstream,
    catalog: Catalog,
    skopeo: Skopeo,
    containerd: Containerd,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    filler = mirror_factory(env=AWS_ENV, **s3_settings(moto_server, bucket))
    src = "docker.io/library/hello:1.0"
    conf = skopeo.registries_conf("docker.io", mirror=f"{filler.host}/docker.io")
    skopeo.copy(conf, src, arch="amd64")
    wanted = catalog.hello.platform("linux/amd64")
    uploads_settled(filler, len(wanted.blobs))

    redirecting = mirror_factory(env=AWS_ENV, **s3_settings(moto_server, bucket, redirect=True))
    # It redirects only what it knows the bucket holds: one look at each blob (a HEAD, the
    # way a pull's first sight of it would make one) teaches it.
    for digest in wanted.blobs:
        path = f"/v2/library/hello/blobs/{digest}?ns={upstream.host}"
        assert http_request("HEAD", redirecting.host, path).status == 200
    upstream.reset()
    conf = skopeo.registries_conf("docker.io", mirror=f"{redirecting.host}/docker.io")
    layout = skopeo.copy(conf, src, arch="amd64")
    assert_one_platform(layout, catalog)

    ns = containerd.namespace()
    ref = f"{upstream.host}/library/hello:1.0"
    containerd.pull(
        ref, containerd.hosts_dir(upstream.host, mirror=redirecting.url), ns, host_platform()
    )
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    assert upstream.blob_bytes() == 0
    # The bytes went from the bucket to the clients: the mirror served (almost) none itself.
    blob_bytes = sum(len(layout.blobs[d]) for d in wanted.blobs)
    assert metric(redirecting, "mirror_served_bytes_total", source="redirect") >= 2 * blob_bytes
    served_itself = sum(
        metric(redirecting, "mirror_served_bytes_total", source=s) for s in ("disk", "s3", "origin")
    )
    assert served_itself == 0
    lines = [line for line in redirecting.log_lines() if line.get("status") == 307]
    assert lines and all(line.get("route") == "blob" for line in lines)
    assert json.dumps(lines).count("manifests") == 0
