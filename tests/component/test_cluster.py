"""Replicas as one cache: three mirrors in front of one fake origin, each digest fetched once,
by its owner, whichever replica the clients ask; a dead owner costs a quick fall-back."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from mirror.config import ClusterConfig
from mirror.oci.peering import PEER_HEADER
from mirror.upstream.ring import rank

from .fakeregistry import FakeRegistry
from .harness import MiB, Served, closed_port, mirror_config, poll, random_bytes

NAME = "team/app"
FAKE = {"ns": "fake.test"}


class Fleet:
    def __init__(self, replicas: list[Served]) -> None:
        self.replicas = replicas
        self.session = aiohttp.ClientSession()

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def replica(self, url: str) -> Served:
        return next(r for r in self.replicas if r.url == url)

    async def get(self, replica: Served, path: str, **kw: object) -> tuple[int, bytes]:
        async with self.session.get(replica.url + path, params=FAKE, **kw) as resp:  # type: ignore[arg-type]
            return resp.status, await resp.read()

    def metric(self, replica: Served, name: str, **labels: str) -> float:
        from mirror.keys import metrics_key

        value = replica.app[metrics_key].registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


async def start_fleet(tmp: Path, fake: FakeRegistry, peers: list[str], members: int) -> Fleet:
    """`members` replicas listening at the first of `peers` (the rest may be dead URLs)."""
    replicas = []
    for i, url in enumerate(peers[:members]):
        base = mirror_config(tmp / f"r{i}", fake.url)
        cluster = ClusterConfig(peers=tuple(peers), self_url=url, peer_timeout=0.5)
        replicas.append(await Served.start(replace(base, cluster=cluster), int(url.rsplit(":")[2])))
    return Fleet(replicas)


@pytest.fixture
async def fleet(fake: FakeRegistry, tmp_path: Path) -> AsyncIterator[Fleet]:
    peers = [f"http://127.0.0.1:{closed_port()}" for _ in range(3)]
    fleet = await start_fleet(tmp_path, fake, peers, 3)
    try:
        yield fleet
    finally:
        await fleet.session.close()
        for replica in fleet.replicas:
            await replica.stop()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_thirty_clients_over_three_replicas_cost_one_origin_download(
    fake: FakeRegistry, fleet: Fleet
) -> None:
    data = random_bytes(3 * MiB, 1)
    digest = fake.add_blob(NAME, data)
    gate = fake.fault("hold", kind="blob", times=1)  # every client is in before a byte flows
    path = f"/v2/{NAME}/blobs/{digest}"
    gets = [asyncio.ensure_future(fleet.get(fleet.replicas[i % 3], path)) for i in range(30)]
    owner = fleet.replica(rank(digest.removeprefix("sha256:"), fleet.urls)[0])
    await gate.reached.wait()
    # Both other replicas have asked the owner (one shared fill each) before a byte flows.
    await poll(
        lambda: (
            fleet.metric(owner, "mirror_peer_requests_total", direction="served", result="ok") >= 2
        ),
        what="the non-owners to ask the owner",
    )
    gate.release()
    for status, body in await asyncio.gather(*gets):
        assert (status, sha(body)) == (200, digest)
    assert fake.body_bytes("blob") == len(data)  # one copy crossed from the origin
    # The others kept a copy: asked again, they answer from disk.
    fake.reset_log()
    for replica in fleet.replicas:
        assert await fleet.get(replica, path) == (200, data)
    assert fake.body_bytes("blob") == 0


async def test_a_dead_owner_is_skipped_for_the_origin_quickly(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    live = f"http://127.0.0.1:{closed_port()}"
    fleet = await start_fleet(tmp_path, fake, [live, dead], 1)
    try:
        for seed in range(50):  # a blob the dead peer would own
            data = random_bytes(MiB, 100 + seed)
            if rank(sha(data).removeprefix("sha256:"), [live, dead])[0] == dead:
                break
        digest = fake.add_blob(NAME, data)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await fleet.get(fleet.replicas[0], f"/v2/{NAME}/blobs/{digest}") == (200, data)
        assert loop.time() - started < 3.0
        assert fake.body_bytes("blob") == len(data)
        live_one = fleet.replicas[0]
        await poll(lambda: fleet.metric(live_one, "mirror_peers", state="down") == 1)
    finally:
        await fleet.session.close()
        await fleet.replicas[0].stop()


async def test_a_client_forging_the_peer_marker_gets_an_ordinary_pull(
    fake: FakeRegistry, fleet: Fleet
) -> None:
    data = random_bytes(MiB, 2)
    digest = fake.add_blob(NAME, data)
    owner_url = rank(digest.removeprefix("sha256:"), fleet.urls)[0]
    other = next(r for r in fleet.replicas if r.url != owner_url)
    status, body = await fleet.get(other, f"/v2/{NAME}/blobs/{digest}", headers={PEER_HEADER: "1"})
    assert (status, body) == (200, data)
    assert fake.body_bytes("blob") == len(data)  # fetched by the replica asked, no hop
    url = f"{other.url}/v2/elsewhere.example/app/blobs/{digest}"
    async with fleet.session.get(url, headers={PEER_HEADER: "1"}) as unknown:
        assert unknown.status == 403  # still only the configured registries


async def test_manifests_by_digest_come_from_their_owner(fake: FakeRegistry, fleet: Fleet) -> None:
    image = fake.add_image(NAME, "v1", [random_bytes(1000, 3)])
    path = f"/v2/{NAME}/manifests/{image.digest}"
    for replica in fleet.replicas:
        assert await fleet.get(replica, path) == (200, image.manifest)
    assert fake.count("manifest-digest", "GET") == 1
