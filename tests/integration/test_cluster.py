"""Three real mirror processes as one regional tier in front of the token-protected
Distribution upstream: one origin download per blob however the clients spread over the
replicas, an owner killed mid-fill never gives a client wrong bytes, and containerd pulling
through one replica after another costs the origin no blob or manifest GET."""

from __future__ import annotations

import hashlib
import http.client
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from mirror.upstream.ring import rank

from .clients import Containerd, host_platform
from .images import Catalog, Image, seed_large
from .mirror_proc import Mirror, MirrorFactory
from .procs import free_port, wait_until
from .upstream import Upstream

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
REPO = "library/spread"


@pytest.fixture(scope="module")
def layered(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """library/spread:1.0, one 24 MiB layer."""
    return seed_large(upstream.registry_host, tmp_path_factory.mktemp("spread"), REPO, 24 * MiB)


def fleet(mirror_factory: MirrorFactory, size: int = 3) -> list[Mirror]:
    ports = [free_port() for _ in range(size)]
    peers = [f"http://127.0.0.1:{p}" for p in ports]
    return [
        mirror_factory(
            port=port, cluster__peers=peers, cluster__self=url, cluster__peer_timeout="1s"
        )
        for port, url in zip(ports, peers, strict=True)
    ]


@dataclass
class Got:
    status: int | None
    body: bytes
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.error is None


def get(mirror: Mirror, path: str) -> Got:
    conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=60)
    status = None
    body = bytearray()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        status = resp.status
        while chunk := resp.read(256 * 1024):
            body += chunk
        if resp.length:  # the body ended before Content-Length
            return Got(status, bytes(body), "short body")
        return Got(status, bytes(body))
    except (OSError, http.client.HTTPException) as exc:
        return Got(status, bytes(body), type(exc).__name__)
    finally:
        conn.close()


def blob_path(upstream: Upstream, digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}?ns={upstream.host}"


def owner_of(replicas: list[Mirror], digest: str) -> Mirror:
    first = rank(digest.removeprefix("sha256:"), [m.url for m in replicas])[0]
    return next(m for m in replicas if m.url == first)


def test_thirty_clients_over_three_replicas_download_the_blob_once(
    mirror_factory: MirrorFactory, upstream: Upstream, layered: Image
) -> None:
    replicas = fleet(mirror_factory)
    layer = layered.platform("linux/amd64").layers[0]
    upstream.reset()
    with ThreadPoolExecutor(30) as pool:
        got = list(pool.map(lambda i: get(replicas[i % 3], blob_path(upstream, layer)), range(30)))
    for answer in got:
        assert answer.complete, answer.error
        assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == layer
    size = len(got[0].body)
    assert upstream.blob_bytes() <= 1.02 * size  # one copy crossed from the origin


def test_an_owner_killed_mid_fill_never_hands_out_wrong_bytes(
    mirror_factory: MirrorFactory, upstream: Upstream, layered: Image
) -> None:
    replicas = fleet(mirror_factory)
    layer = layered.platform("linux/amd64").layers[0]
    owner = owner_of(replicas, layer)
    survivors = [m for m in replicas if m is not owner]
    upstream.reset()
    upstream.set_faults({"action": "throttle", "kind": "blob", "rate": 6 * MiB})  # ~4 s
    try:
        with ThreadPoolExecutor(30) as pool:
            futures = [
                pool.submit(get, replicas[i % 3], blob_path(upstream, layer)) for i in range(30)
            ]
            # The owner is filling, and the others stream from it.
            wait_until(lambda: upstream.blob_bytes() > 4 * MiB, timeout=30, what="the fill")
            owner.kill()
            upstream.clear_faults()
            got = [(f.result(), i % 3) for i, f in enumerate(futures)]
    finally:
        upstream.clear_faults()
    for answer, index in got:
        if answer.complete:
            assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == layer
        elif replicas[index] is not owner:
            # A survivor's client: the fill went on from the next source; at worst it was
            # refused before its headers, never cut short with bytes that are wrong.
            assert answer.status is not None and answer.status >= 500, answer
    assert all(answer.complete for answer, i in got if replicas[i] in survivors)
    # And it was the owner dying under them that they rode out, not a fill of their own.
    skipped = [
        line
        for m in survivors
        for line in m.log_lines()
        if line.get("event") == "fill_source_skipped"
    ]
    assert skipped and {line["source"] for line in skipped} == {"peer"}, skipped


def test_ctr_pulls_through_one_replica_then_another_and_the_origin_serves_no_bytes(
    mirror_factory: MirrorFactory, upstream: Upstream, catalog: Catalog, containerd: Containerd
) -> None:
    replicas = fleet(mirror_factory)
    ref = f"{upstream.host}/library/hello:1.0"
    platform = host_platform()
    first_ns, second_ns = containerd.namespace(), containerd.namespace()
    containerd.pull(
        ref, containerd.hosts_dir(upstream.host, mirror=replicas[0].url), first_ns, platform
    )
    upstream.reset()
    containerd.pull(
        ref, containerd.hosts_dir(upstream.host, mirror=replicas[2].url), second_ns, platform
    )
    assert containerd.images(second_ns) == {ref: catalog.hello.digest}
    counts = upstream.counts()
    seen = "upstream saw:\n" + "\n".join(map(str, upstream.requests()))
    assert counts[("GET", "blob")] == 0, seen
    assert counts[("GET", "manifest_tag")] + counts[("GET", "manifest_digest")] == 0, seen
