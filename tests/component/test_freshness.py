"""Tag freshness: zero upstream requests within tag_ttl, one HEAD after it, a manifest GET only
for a digest the cache lacks, and one revalidation however many clients ask at once.

create_app wires ManifestService to time.time, so the TTLs here are real and short (a few
tenths of a second) rather than driven by an injected clock. Each test runs against the served
mirror with the manifest fast path on and off (both_paths).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mirror.config import Config

from .conftest import MakeMirror
from .fakeregistry import OCI_INDEX, OCI_MANIFEST, FakeRegistry, Image
from .harness import FakeClock, KiB, Mirror, mirror_config, poll, random_bytes

# Every case runs against the production server twice, manifest fast path on and off: a tag
# answered before aiohttp must keep the same TTL, revalidation and Accept rules.
pytestmark = pytest.mark.both_paths

FAKE = {"ns": "fake.test"}
TAG_URL = "/v2/team/app/manifests/v1"
TTL = 300.0  # the default: the mirror's clock is the test's to move (FakeClock)


def config(tmp_path: Path, fake: FakeRegistry, **cache: Any) -> Config:
    base = mirror_config(tmp_path / "cache", fake.url)
    return replace(base, cache=replace(base.cache, **cache))


def seed(fake: FakeRegistry, seed: int = 1, tag: str = "v1") -> Image:
    return fake.add_image("team/app", tag, [random_bytes(20 * KiB, seed)])


async def ask(mirror: Mirror, method: str = "GET", url: str = TAG_URL) -> tuple[str, bytes]:
    """(Docker-Content-Digest, body) of a 200 answer."""
    resp = await mirror.client.request(method, url, params=FAKE)
    body = await resp.read()
    assert resp.status == 200, body
    return resp.headers["Docker-Content-Digest"], body


def expire(clock: FakeClock) -> None:
    clock.advance(TTL + 1)


def upstream_counts(fake: FakeRegistry) -> Counter[tuple[str, str]]:
    return Counter((r.method, r.kind) for r in fake.log)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_fresh_tag_asks_the_upstream_nothing(
    fake: FakeRegistry, mirror: Mirror, method: str
) -> None:
    """containerd's second pull sends only the tag HEAD: the hottest request of all."""
    image = seed(fake)
    assert await ask(mirror) == (image.digest, image.manifest)
    fake.reset_log()
    for _ in range(10):
        digest, body = await ask(mirror, method)
        assert digest == image.digest
        assert body == (image.manifest if method == "GET" else b"")
    assert fake.log == []
    assert mirror.requests("manifest", "hit") == 10


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_expired_tag_is_revalidated_with_one_head(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, method: str, clock: FakeClock
) -> None:
    """Docker Hub counts a manifest GET as a pull and a HEAD as free."""
    mirror = await make_mirror(config=config(tmp_path, fake, tag_ttl=TTL), clock=clock)
    image = seed(fake)
    await ask(mirror)
    expire(clock)
    fake.reset_log()
    digest, _ = await ask(mirror, method)
    assert digest == image.digest
    assert upstream_counts(fake) == Counter({("HEAD", "manifest-tag"): 1})
    assert mirror.requests("manifest", "revalidated") == 1
    # The HEAD refreshed the record: the tag is fresh for another TTL.
    assert await ask(mirror, method) == (digest, image.manifest if method == "GET" else b"")
    assert len(fake.log) == 1


async def test_moved_tag_gets_only_the_manifest_it_lacks(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    mirror = await make_mirror(config=config(tmp_path, fake, tag_ttl=TTL), clock=clock)
    old = seed(fake, 1)
    assert await ask(mirror) == (old.digest, old.manifest)

    new = seed(fake, 2)  # v1 now names another manifest
    expire(clock)
    fake.reset_log()
    assert await ask(mirror) == (new.digest, new.manifest)
    assert upstream_counts(fake) == Counter(
        {("HEAD", "manifest-tag"): 1, ("GET", "manifest-digest"): 1}
    )
    assert fake.requests(kind="manifest-digest")[0].ref == new.digest

    # Back to a manifest the cache holds: the HEAD is all it takes.
    fake.repos["team/app"].tags["v1"] = old.digest
    expire(clock)
    fake.reset_log()
    assert await ask(mirror) == (old.digest, old.manifest)
    assert upstream_counts(fake) == Counter({("HEAD", "manifest-tag"): 1})
    # And the old manifest by digest never needed the upstream.
    fake.reset_log()
    resp = await mirror.client.get(f"/v2/team/app/manifests/{new.digest}", params=FAKE)
    assert await resp.read() == new.manifest
    assert fake.log == []


async def test_concurrent_revalidations_of_a_tag_coalesce(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    mirror = await make_mirror(config=config(tmp_path, fake, tag_ttl=TTL), clock=clock)
    image = seed(fake)
    await ask(mirror)
    expire(clock)
    fake.reset_log()
    gate = fake.fault("hold", kind="manifest-tag", method="HEAD")
    started = mirror.server_requests()
    clients = 20
    answers = [asyncio.create_task(ask(mirror, "GET" if i % 2 else "HEAD")) for i in range(clients)]
    await asyncio.wait_for(gate.reached.wait(), 5)
    # Every client is inside the mirror while the one HEAD is held at the upstream.
    await poll(lambda: mirror.server_requests() >= started + clients, what="all clients in")
    await asyncio.sleep(0.05)
    gate.release()
    results = await asyncio.gather(*answers)
    assert {digest for digest, _ in results} == {image.digest}
    assert upstream_counts(fake) == Counter({("HEAD", "manifest-tag"): 1})


async def test_concurrent_first_requests_for_a_tag_coalesce(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    image = seed(fake)
    gate = fake.fault("hold", kind="manifest-tag")
    started = mirror.server_requests()
    answers = [asyncio.create_task(ask(mirror)) for _ in range(20)]
    await asyncio.wait_for(gate.reached.wait(), 5)
    await poll(lambda: mirror.server_requests() >= started + 20, what="all clients in")
    await asyncio.sleep(0.05)
    gate.release()
    assert set(await asyncio.gather(*answers)) == {(image.digest, image.manifest)}
    assert upstream_counts(fake) == Counter({("GET", "manifest-tag"): 1})


async def test_tag_record_outlives_a_restart(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    """fetched_at is wall-clock and on disk: a restarted mirror keeps the TTL it had."""
    cfg = config(tmp_path, fake, tag_ttl=TTL)
    first = await make_mirror(config=cfg, clock=clock)
    image = seed(fake)
    await ask(first)
    await first.client.close()
    fake.reset_log()
    clock.advance(TTL / 2)  # the restart takes a while: the record is still fresh after it
    second = await make_mirror(config=cfg, clock=clock)
    assert await ask(second, "HEAD") == (image.digest, b"")
    assert fake.log == []
    clock.advance(TTL / 2 + 1)
    assert await ask(second, "HEAD") == (image.digest, b"")
    assert upstream_counts(fake) == Counter({("HEAD", "manifest-tag"): 1})


DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"


async def refused(mirror: Mirror, method: str, accept: str) -> str:
    """The error message of a 404 MANIFEST_UNKNOWN (HEAD answers carry no body: empty)."""
    resp = await mirror.client.request(method, TAG_URL, params=FAKE, headers={"Accept": accept})
    assert resp.status == 404
    if method == "HEAD":
        return ""
    error = (await resp.json())["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    return str(error["message"])


async def test_a_fresh_tag_of_another_media_type_is_refused_from_the_cache(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    """The mirror fetched the tag with every manifest type in its Accept, so its answer is the
    origin's: asking again with a narrower Accept would cost a pull on Docker Hub each time."""
    image = seed(fake)  # an OCI image manifest
    assert await ask(mirror) == (image.digest, image.manifest)
    fake.reset_log()
    for method in ("GET", "HEAD") * 3:
        message = await refused(mirror, method, DOCKER_V2)
        if method == "GET":
            assert "application/vnd.oci.image.manifest.v1+json" in message
            assert DOCKER_V2 in message
    assert fake.log == []


async def test_an_expired_tag_of_another_media_type_costs_one_head(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    # tag_ttl 0: every request finds the tag expired, without waiting on a clock.
    mirror = await make_mirror(config=config(tmp_path, fake, tag_ttl=0.0))
    seed(fake)
    await ask(mirror)
    fake.reset_log()
    for method in ("GET", "HEAD"):
        await refused(mirror, method, DOCKER_V2)
    assert upstream_counts(fake) == Counter({("HEAD", "manifest-tag"): 2})

    # The tag moved to a manifest of the client's type: the HEAD finds it, one GET by digest.
    body = b'{"schemaVersion": 2, "mediaType": "%s", "layers": []}' % DOCKER_V2.encode()
    moved = fake.add_manifest("team/app", body, DOCKER_V2, tag="v1")
    fake.reset_log()
    resp = await mirror.client.get(TAG_URL, params=FAKE, headers={"Accept": DOCKER_V2})
    assert resp.status == 200
    assert (resp.headers["Docker-Content-Digest"], await resp.read()) == (moved, body)
    assert upstream_counts(fake) == Counter(
        {("HEAD", "manifest-tag"): 1, ("GET", "manifest-digest"): 1}
    )


def seed_index(fake: FakeRegistry, image: Image) -> tuple[str, bytes]:
    """Tag v1 made an index whose one entry, linux/amd64, is `image`."""
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest),
            "platform": {"os": "linux", "architecture": "amd64"},
        }],
    }).encode()  # fmt: skip
    return fake.add_manifest("team/app", index, OCI_INDEX, tag="v1"), index


async def narrow(mirror: Mirror, method: str = "GET", accept: str = OCI_MANIFEST) -> Any:
    return await mirror.client.request(method, TAG_URL, params=FAKE, headers={"Accept": accept})


async def test_a_client_that_rejects_the_tags_index_gets_the_origins_answer_once_a_ttl(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    """Registries answer a client that does not accept a tag's index with its linux/amd64
    manifest (old Docker clients rely on that). The mirror asks once per tag and Accept set,
    then serves that answer from the cache for the tag TTL."""
    image = seed(fake)
    index_digest, index = seed_index(fake, image)
    assert await ask(mirror) == (index_digest, index)
    fake.reset_log()

    for method in ("GET", "HEAD") * 3:
        resp = await mirror.client.request(
            method, TAG_URL, params=FAKE, headers={"Accept": OCI_MANIFEST}
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert resp.headers["Content-Length"] == str(len(image.manifest))
        if method == "GET":
            assert await resp.read() == image.manifest
    assert upstream_counts(fake) == Counter({("GET", "manifest-tag"): 1})
    assert await ask(mirror) == (index_digest, index)  # broad clients still get the index

    # No answer of a type the client takes: the registry's 404, asked once, kept for the TTL.
    fake.reset_log()
    for method in ("GET", "HEAD"):
        await refused(mirror, method, DOCKER_V2)
    assert upstream_counts(fake) == Counter({("GET", "manifest-tag"): 1})


async def test_however_a_client_varies_its_accept_the_origin_is_asked_once(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    """The answer depends only on the image types the client takes: junk in its Accept header
    must not turn each request into a Docker Hub pull."""
    image = seed(fake)
    seed_index(fake, image)
    await ask(mirror)
    fake.reset_log()
    for i in range(5):
        resp = await narrow(mirror, accept=f"{OCI_MANIFEST}, x/y{i}")
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image.digest
    assert upstream_counts(fake) == Counter({("GET", "manifest-tag"): 1})

    fake.reset_log()  # no image type at all: nothing the origin could answer, so not asked
    assert "application/json" in await refused(mirror, "GET", "application/json")
    assert fake.log == []


async def test_an_origin_that_ignores_accept_is_asked_once_a_ttl(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    fake.ignore_accept = True
    seed_index(fake, seed(fake))
    await ask(mirror)
    fake.reset_log()
    for method in ("GET", "HEAD") * 3:
        await refused(mirror, method, OCI_MANIFEST)
    assert upstream_counts(fake) == Counter({("GET", "manifest-tag"): 1})


async def test_a_narrow_answer_outlives_an_outage_and_its_absence_is_a_503(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    mirror = await make_mirror(config=config(tmp_path, fake, tag_ttl=TTL), clock=clock)
    image = seed(fake)
    seed_index(fake, image)
    await ask(mirror)
    assert (await narrow(mirror)).headers["Docker-Content-Digest"] == image.digest

    expire(clock)
    fake.fault("status", status=500)
    resp = await narrow(mirror)  # the tag is stale, the narrowed answer too: both served
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert await resp.read() == image.manifest

    # Never asked before, nothing to fall back on: the client hears 503, never a 500.
    resp = await narrow(mirror, accept=DOCKER_V2)
    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
