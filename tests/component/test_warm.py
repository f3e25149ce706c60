"""The warm API: only requested platforms, the live pull path shared, bad input, the token;
its own loopback listener, and bounded work whoever asks: jobs and the images they have left
are capped, and a job stops asking the origin once its answers say the rest would fail too (a
run of missing tags, a rate limit)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from mirror.cache.warming import MAX_ACTIVE_JOBS, MAX_FAILED_IN_A_ROW, MAX_QUEUED_IMAGES
from mirror.keys import metrics_key

from .fakeregistry import FakeRegistry
from .harness import mirror_config
from .served import served
from .warm_fakes import MirrorClients, WarmRegistry, serve_mirror, serve_registry

# What containerd sends when it resolves a tag.
CONTAINERD_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
)
TOKEN = "s3cret-admin-token"

StartMirror = Callable[..., Awaitable[MirrorClients]]
CONCURRENCY = 4  # warm.concurrency's default: images resolved at once


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[WarmRegistry]:
    registry = await serve_registry(aiohttp_server)
    yield registry
    registry.release_all()  # a held body must not keep the server from closing


@pytest.fixture
def start_mirror(aiohttp_client: Any, upstream: WarmRegistry, tmp_path: Path) -> StartMirror:
    return partial(serve_mirror, aiohttp_client, tmp_path / "cache", upstream.url)


async def submit(
    client: MirrorClients, images: list[str], platforms: list[str] | None = None
) -> str:
    body: dict[str, Any] = {"images": images}
    if platforms is not None:
        body["platforms"] = platforms
    resp = await client.post("/admin/warm", json=body)
    assert resp.status == 202, await resp.text()
    doc = await resp.json()
    assert doc["status_url"] == f"/admin/warm/{doc['id']}" == resp.headers["Location"]
    return str(doc["id"])


async def job_status(client: MirrorClients, job_id: str) -> dict[str, Any]:
    resp = await client.get(f"/admin/warm/{job_id}")
    assert resp.status == 200
    doc: dict[str, Any] = await resp.json()
    return doc


async def wait_job(
    client: MirrorClients,
    job_id: str,
    until: Callable[[dict[str, Any]], bool] = lambda job: job["state"] in ("done", "failed"),
    within: float = 10.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        job = await job_status(client, job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job never got there: {json.dumps(job, indent=1)}"
        await asyncio.sleep(0.01)


async def test_warm_fetches_only_the_requested_platform_and_a_pull_then_stays_local(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image(
        "team/app", "1.0", ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"], (5000, 7000)
    )
    arm64 = image.platforms["linux/arm64/v8"]
    client = await start_mirror()

    job = await wait_job(client, await submit(client, ["fake.test/team/app:1.0"], ["linux/arm64"]))

    assert job["state"] == "done"
    [status] = job["images"]
    total = sum(arm64.sizes.values())
    assert status["state"] == "done" and status["reason"] is None
    assert status["digest"] == image.index
    assert status["platforms"] == ["linux/arm64/v8"]
    assert (status["blobs_done"], status["blobs_total"], status["blobs_cached"]) == (3, 3, 0)
    assert status["bytes_done"] == status["bytes_total"] == total
    assert job["bytes_done"] == job["bytes_total"] == total
    assert status["started"] and status["finished"] and job["finished"]
    for blob in arm64.blobs:
        assert upstream.count("blob", blob) == 1
    for other in ("linux/amd64", "linux/arm/v7"):
        assert upstream.count("manifest", image.platforms[other].manifest) == 0
        assert all(upstream.count("blob", b) == 0 for b in image.platforms[other].blobs)

    # A live pull of that platform, as containerd does it, now needs nothing from upstream.
    asked = len(upstream.log)
    accept = {"Accept": CONTAINERD_ACCEPT}
    resp = await client.head("/v2/team/app/manifests/1.0?ns=fake.test", headers=accept)
    assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == image.index
    resp = await client.get("/v2/team/app/manifests/1.0?ns=fake.test", headers=accept)
    assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == image.index
    resp = await client.get(f"/v2/team/app/manifests/{arm64.manifest}?ns=fake.test", headers=accept)
    assert resp.status == 200
    for blob in arm64.blobs:
        resp = await client.get(f"/v2/team/app/blobs/{blob}?ns=fake.test")
        assert resp.status == 200
        assert await resp.read() == upstream.blobs[blob]
    assert upstream.log[asked:] == []


async def test_a_warm_and_a_live_pull_of_one_blob_share_one_download(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image("team/app", "1.0", ["linux/amd64"], (4000, 300_000))
    amd64 = image.platforms["linux/amd64"]
    big = amd64.blobs[2]
    held = upstream.hold(big)
    client = await start_mirror()

    job_id = await submit(client, ["team/app:1.0"], ["linux/amd64"])
    await asyncio.wait_for(held.reached.wait(), 5)
    # The job reports the bytes of the download in flight, not just finished blobs.
    halfway = sum(amd64.sizes.values()) - amd64.sizes[big] + amd64.sizes[big] // 2
    job = await wait_job(
        client, job_id, lambda job: job["blobs_done"] == 2 and job["bytes_done"] == halfway
    )
    assert job["state"] == "running"
    assert job["images"][0]["state"] == "fetching"

    live = await client.get(f"/v2/team/app/blobs/{big}?ns=fake.test")  # headers: joined
    assert live.status == 200
    held.release()
    assert await live.read() == upstream.blobs[big]
    job = await wait_job(client, job_id)

    assert job["state"] == "done"
    assert upstream.count("blob", big) == 1
    metrics = client.app[metrics_key].registry
    sample = {"kind": "blob", "result": "coalesced"}
    assert metrics.get_sample_value("mirror_requests_total", sample) == 1


async def test_a_job_counts_a_blob_its_images_share_once(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image("team/app", "1.0", ["linux/amd64"], (4000, 300_000))
    upstream.tags[("team/app", "stable")] = image.index  # one image under two tags
    amd64 = image.platforms["linux/amd64"]
    total = sum(amd64.sizes.values())
    big = amd64.blobs[2]
    held = upstream.hold(big)
    client = await start_mirror()

    job_id = await submit(client, ["team/app:1.0", "team/app:stable"])
    await asyncio.wait_for(held.reached.wait(), 5)
    halfway = total - amd64.sizes[big] + amd64.sizes[big] // 2
    job = await wait_job(
        client,
        job_id,
        lambda job: all((i["blobs_done"], i["bytes_done"]) == (2, halfway) for i in job["images"]),
    )
    # Each image shows its own blobs; the job counts the shared ones (all three) once.
    assert [(i["blobs_done"], i["blobs_total"]) for i in job["images"]] == [(2, 3), (2, 3)]
    assert (job["bytes_done"], job["bytes_total"]) == (halfway, total)
    assert (job["blobs_done"], job["blobs_total"]) == (2, 3)

    held.release()
    job = await wait_job(client, job_id)

    assert job["state"] == "done"
    assert [i["bytes_done"] for i in job["images"]] == [total, total]
    assert job["bytes_done"] == job["bytes_total"] == total
    assert job["blobs_done"] == job["blobs_total"] == 3
    assert upstream.count("blob", big) == 1


@pytest.mark.parametrize(
    ("tag_ttl", "expected"),
    [(300.0, []), (0.0, [("HEAD", "manifest", "1.0")])],
    ids=["tag-fresh", "tag-expired"],
)
async def test_rewarming_a_cached_image_fetches_no_blobs(
    upstream: WarmRegistry,
    start_mirror: StartMirror,
    tag_ttl: float,
    expected: list[tuple[str, str, str]],
) -> None:
    image = upstream.image("team/app", "1.0", ["linux/amd64", "linux/arm64"])
    client = await start_mirror(tag_ttl=tag_ttl)
    platforms = ["linux/amd64", "linux/arm64"]
    first = await wait_job(client, await submit(client, ["team/app:1.0"], platforms))
    assert first["state"] == "done" and first["blobs_done"] == 4
    asked = len(upstream.log)

    again = await wait_job(client, await submit(client, ["team/app:1.0"], platforms))

    assert again["state"] == "done"
    [status] = again["images"]
    assert status["digest"] == image.index
    assert status["blobs_done"] == status["blobs_cached"] == 4
    assert status["bytes_done"] == first["bytes_total"]
    assert [(r.method, r.kind, r.ref) for r in upstream.log[asked:]] == expected


async def test_a_digest_pinned_reference_and_default_platforms(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image("team/app", "1.0", ["linux/amd64", "linux/arm64"])
    amd64 = image.platforms["linux/amd64"]
    client = await start_mirror()

    by_index = await wait_job(client, await submit(client, [f"team/app@{image.index}"]))
    by_manifest = await wait_job(client, await submit(client, [f"team/app@{amd64.manifest}"]))

    # Without platforms the configured default applies: linux/amd64.
    assert by_index["state"] == "done" and by_index["platforms"] == ["linux/amd64"]
    assert by_index["images"][0]["platforms"] == ["linux/amd64"]
    assert by_manifest["state"] == "done"
    assert by_manifest["images"][0]["digest"] == amd64.manifest
    assert by_manifest["images"][0]["blobs_cached"] == len(amd64.blobs)
    assert upstream.count("manifest", "1.0") == 0
    assert all(upstream.count("blob", b) == 0 for b in image.platforms["linux/arm64"].blobs)


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        (["linux/arm"], ["linux/arm/v7"]),  # arm is arm/v7: never v6 as well
        (["linux/arm/v6"], ["linux/arm/v6"]),
        (["linux/arm64", "linux/arm/v7"], ["linux/arm64/v8", "linux/arm/v7"]),
        (["linux/arm", "linux/arm/v7"], ["linux/arm/v7"]),  # one platform, spelt twice
    ],
    ids=["arm", "arm-v6", "arm64-and-arm", "same-twice"],
)
async def test_each_requested_platform_fetches_the_one_manifest_a_node_pulls(
    upstream: WarmRegistry, start_mirror: StartMirror, wanted: list[str], expected: list[str]
) -> None:
    offered = ["linux/arm/v6", "linux/arm/v7", "linux/arm64/v8", "linux/amd64"]
    image = upstream.image("team/arm", "1.0", offered)
    client = await start_mirror()

    job = await wait_job(client, await submit(client, ["team/arm:1.0"], wanted))

    [status] = job["images"]
    assert job["state"] == "done" and status["platforms"] == expected
    assert status["notes"] == [] and status["missing_platforms"] == []
    for platform, content in image.platforms.items():
        fetched = [upstream.count("blob", b) for b in content.blobs]
        assert fetched == [int(platform in expected)] * len(content.blobs), platform
        assert upstream.count("manifest", content.manifest) == int(platform in expected)


async def test_a_platform_missing_from_the_index_is_a_note_when_others_were_warmed(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image("team/app", "1.0", ["linux/amd64", "linux/arm64/v8"])
    client = await start_mirror()

    job = await wait_job(
        client, await submit(client, ["team/app:1.0"], ["linux/amd64", "linux/s390x"])
    )

    assert job["state"] == "done"
    [status] = job["images"]
    assert status["state"] == "done" and status["reason"] is None
    assert status["platforms"] == ["linux/amd64"]
    assert status["missing_platforms"] == ["linux/s390x"]
    assert status["notes"] == [
        "not in the index: linux/s390x (it has: linux/amd64, linux/arm64/v8)"
    ]
    assert status["blobs_done"] == len(image.platforms["linux/amd64"].blobs)


async def test_a_fallback_platform_is_warmed_with_a_note(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image("team/old", "1.0", ["linux/arm/v7", "linux/amd64"])
    client = await start_mirror()

    job = await wait_job(client, await submit(client, ["team/old:1.0"], ["linux/arm64"]))

    [status] = job["images"]
    assert status["state"] == "done" and status["platforms"] == ["linux/arm/v7"]
    assert "warmed linux/arm/v7, which a linux/arm64 node pulls instead" in status["notes"][0]
    assert all(upstream.count("blob", b) == 1 for b in image.platforms["linux/arm/v7"].blobs)


async def test_a_single_platform_image_is_warmed_whatever_the_platforms(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image("team/plain", "1.0", ["linux/amd64"])
    amd64 = image.platforms["linux/amd64"]
    upstream.tags[("team/plain", "1.0")] = amd64.manifest  # a tag naming a manifest, no index
    client = await start_mirror()

    job = await wait_job(client, await submit(client, ["team/plain:1.0"], ["linux/arm64"]))

    [status] = job["images"]
    assert job["state"] == "done" and status["digest"] == amd64.manifest
    assert status["platforms"] == [] and status["notes"] == []
    assert status["blobs_done"] == len(amd64.blobs)


async def test_images_that_cannot_be_warmed_fail_with_a_reason(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    upstream.image("team/app", "1.0", ["linux/amd64"])
    upstream.image("team/armonly", "1.0", ["linux/arm64"])
    broken = upstream.image("team/broken", "1.0", ["linux/amd64"])
    lost = broken.platforms["linux/amd64"].blobs[1]
    del upstream.blobs[lost]
    client = await start_mirror()

    images = ["team/app:1.0", "team/gone:1.0", "team/armonly:1.0", "team/broken:1.0"]
    job = await wait_job(client, await submit(client, images, ["linux/amd64"]))

    assert job["state"] == "failed"
    assert (job["images_done"], job["images_failed"]) == (1, 3)
    by_image = {i["image"]: i for i in job["images"]}
    assert by_image["team/app:1.0"]["state"] == "done"
    gone = by_image["team/gone:1.0"]
    assert gone["state"] == "failed" and "MANIFEST_UNKNOWN" in gone["reason"]
    armonly = by_image["team/armonly:1.0"]
    assert armonly["state"] == "failed"
    assert armonly["reason"] == "the index has no manifest for linux/amd64 (it has: linux/arm64)"
    assert armonly["missing_platforms"] == ["linux/amd64"]
    assert by_image["team/broken:1.0"]["reason"].startswith(f"blob {lost}: BLOB_UNKNOWN")
    metrics = client.app[metrics_key].registry
    assert metrics.get_sample_value("mirror_warm_jobs_total", {"state": "failed"}) == 1


BIG_BODY = b'{"images": ["' + b"a" * (1024 * 1024) + b'"]}'


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "not JSON"),
        (b'["fake.test/a:1"]', 400, "must be a JSON object"),
        (b"{}", 400, "images is required"),
        (b'{"images": "fake.test/a:1"}', 400, "images must be a list of strings"),
        (b'{"images": [1]}', 400, "images must be a list of strings"),
        (b'{"images": []}', 400, "images: the list is empty"),
        (json.dumps({"images": ["a"] * 501}).encode(), 400, "501 given, at most 500"),
        (b'{"images": ["a:1", "Team/App:1"]}', 400, "images[1]: 'Team/App:1'"),
        (b'{"images": ["a:1:2"]}', 400, "invalid"),
        (b'{"images": ["ghcr.io/org/a:1"]}', 400, "registry 'ghcr.io' is not configured"),
        (b'{"images": ["a"], "platforms": ["linux"]}', 400, "'linux' is not os/arch[/variant]"),
        (b'{"images": ["a"], "platforms": []}', 400, "platforms: the list is empty"),
        (b'{"images": ["a"], "platform": ["linux/amd64"]}', 400, "unknown fields: platform"),
        (BIG_BODY, 413, "larger than 1048576 bytes"),
        (b"[" * 100_000, 400, "JSON nested too deeply"),
        (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    ],
    ids=[
        "not-json", "not-object", "no-images", "images-not-list", "image-not-string",
        "empty", "too-many", "bad-name", "bad-tag", "unknown-registry", "bad-platform",
        "no-platforms", "unknown-field", "too-big", "nested-array", "nested-in-object",
    ],
)  # fmt: skip
async def test_bad_requests_are_refused_with_an_oci_error(
    start_mirror: StartMirror, body: bytes, status: int, message: str
) -> None:
    client = await start_mirror()

    resp = await client.post("/admin/warm", data=body)

    assert resp.status == status
    assert resp.content_type == "application/json"
    [error] = (await resp.json())["errors"]
    assert error["code"] == "BAD_REQUEST"
    assert message in error["message"]
    listed = await client.get("/admin/warm")
    assert (await listed.json())["jobs"] == []


async def test_an_oversized_body_without_a_length_is_413_with_an_oci_error(
    start_mirror: StartMirror,
) -> None:
    client = await start_mirror()

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse early
        yield b'{"images": ["'
        for _ in range(20):
            yield b"a" * 64 * 1024
        yield b'"]}'

    resp = await client.post("/admin/warm", data=chunks())

    assert resp.status == 413 and resp.content_type == "application/json"
    [error] = (await resp.json())["errors"]
    assert error == {"code": "BAD_REQUEST", "message": "the body is larger than 1048576 bytes"}


async def test_an_unknown_job_is_404(start_mirror: StartMirror) -> None:
    client = await start_mirror()
    resp = await client.get("/admin/warm/0123456789abcdef")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "NOT_FOUND"


async def test_recent_jobs_are_listed_newest_first(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    upstream.image("team/app", "1.0", ["linux/amd64"])
    client = await start_mirror()
    first = await submit(client, ["team/app:1.0"])
    await wait_job(client, first)
    second = await submit(client, ["team/app:1.0", "team/app:2.0"])
    await wait_job(client, second)

    resp = await client.get("/admin/warm")

    jobs = (await resp.json())["jobs"]
    assert [j["id"] for j in jobs] == [second, first]
    assert [j["state"] for j in jobs] == ["failed", "done"]
    assert "images" not in jobs[0] and jobs[0]["images_total"] == 2


async def test_the_admin_token_is_required_and_never_logged(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    upstream.image("team/app", "1.0", ["linux/amd64"])
    body = {"images": ["team/app:1.0"]}
    with capture_logs() as logs:
        client = await start_mirror(admin_token=TOKEN)
        refused = [
            await client.post("/admin/warm", json=body),
            await client.post("/admin/warm", json=body, headers={"Authorization": "Bearer nope"}),
            await client.post("/admin/warm", json=body, headers={"Authorization": TOKEN}),
            await client.post(
                "/admin/warm", json=body, headers={"Authorization": f"Basic {TOKEN}"}
            ),
            await client.post(
                "/admin/warm", json=body, headers={"Authorization": "Bearer s3cret-\u00e9"}
            ),
            await client.get("/admin/warm"),
            await client.get("/admin/warm/0123456789abcdef"),
        ]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        accepted = await client.post("/admin/warm", json=body, headers=auth)
        job_id = (await accepted.json())["id"]
        listed = await client.get("/admin/warm", headers=auth)

    for resp in refused:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
        assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert accepted.status == 202
    assert listed.status == 200
    assert [j["id"] for j in (await listed.json())["jobs"]] == [job_id]
    assert any(entry["event"] == "request" for entry in logs)  # the capture did see the lines
    assert TOKEN not in repr(logs)


# ------------------------------------------------------------------ listeners


async def test_only_the_admin_listener_serves_the_admin_api(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    config = mirror_config(tmp_path / "cache", fake.url)
    config = replace(config, server=replace(config.server, access_log=False))
    body = {"images": ["fake.test/team/app:1.0"]}
    async with served(config) as mirror, aiohttp.ClientSession() as session:
        answers = {}
        for where, base in (("registry", mirror.url), ("admin", mirror.admin_url)):
            for method, path in (("POST", "/admin/warm"), ("GET", "/admin/warm")):
                async with session.request(method, base + path, json=body) as resp:
                    answers[where, method] = (resp.status, await resp.json())
            async with session.get(base + "/metrics") as resp:
                answers[where, "metrics"] = (resp.status, None)

    for method in ("POST", "GET"):
        status, doc = answers["registry", method]
        assert status == 404
        assert doc["errors"][0]["code"] == "NOT_FOUND"
    assert answers["admin", "POST"][0] == 202
    assert answers["admin", "GET"][0] == 200
    assert [j["images_total"] for j in answers["admin", "GET"][1]["jobs"]] == [1]
    # The probes and metrics stay where the kubelet and Prometheus look for them.
    assert answers["registry", "metrics"][0] == 200
    assert answers["admin", "metrics"][0] == 404


# ------------------------------------------------------------------ bounded work


def _held_images(upstream: WarmRegistry, count: int) -> list[str]:
    """Images whose layer download hangs until the test ends: each keeps a warm slot busy."""
    images = []
    for n in range(count):
        image = upstream.image(f"team/held{n}", "1.0", ["linux/amd64"])
        upstream.hold(image.platforms["linux/amd64"].blobs[1])
        images.append(f"team/held{n}:1.0")
    return images


async def _refusal(client: Any, images: list[str]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/admin/warm", json={"images": images})
    return resp.status, await resp.json()


async def test_unfinished_jobs_are_capped(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    client = await start_mirror()
    held = _held_images(upstream, 1)
    for _ in range(MAX_ACTIVE_JOBS):
        await submit(client, held)  # each waits on the same held download

    status, doc = await _refusal(client, held)

    assert status == 503
    (error,) = doc["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert f"{MAX_ACTIVE_JOBS} warm jobs are not finished" in error["message"]


async def test_images_left_across_jobs_are_capped(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    client = await start_mirror()
    held = _held_images(upstream, CONCURRENCY)  # every slot busy: the rest stay queued
    per_job = 500
    jobs = MAX_QUEUED_IMAGES // per_job
    for j in range(jobs):
        extra = [f"team/queued{j}-{n}:1.0" for n in range(per_job - (len(held) if j == 0 else 0))]
        await submit(client, (held if j == 0 else []) + extra)

    status, doc = await _refusal(client, ["team/one-more:1.0"])

    assert status == 503
    assert f"over {MAX_QUEUED_IMAGES}" in doc["errors"][0]["message"]


async def test_a_list_of_missing_tags_stops_after_a_run_of_failures(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    """500 missing tags used to mean 500 upstream manifest requests (Docker Hub pulls)."""
    client = await start_mirror()
    job_id = await submit(client, [f"team/missing:{n}" for n in range(500)])

    job = await wait_job(client, job_id, within=30)

    asked = upstream.count("manifest")
    reasons = [image["reason"] for image in job["images"]]
    tried = [r for r in reasons if "MANIFEST_UNKNOWN" in r]
    skipped = [r for r in reasons if r.startswith("not tried:")]
    assert job["state"] == "failed" and job["images_failed"] == 500
    assert MAX_FAILED_IN_A_ROW <= len(tried) < MAX_FAILED_IN_A_ROW + CONCURRENCY
    assert len(tried) + len(skipped) == 500
    assert f"{MAX_FAILED_IN_A_ROW} images in a row failed to resolve" in skipped[0]
    assert asked <= 2 * len(tried)  # a HEAD and a GET at most per tag tried


async def test_a_job_stops_asking_a_registry_that_rate_limits_it(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    for n in range(20):
        upstream.image("team/app", f"{n}", ["linux/amd64"])
    upstream.manifest_status = 429  # no Retry-After: the breaker alone would wait for 5
    client = await start_mirror()
    job_id = await submit(client, [f"team/app:{n}" for n in range(20)])

    job = await wait_job(client, job_id)

    reasons = [image["reason"] for image in job["images"]]
    assert job["images_failed"] == 20
    assert upstream.count("manifest") <= CONCURRENCY  # those already asked when the first failed
    skipped = [r for r in reasons if r.startswith("not tried: fake.test could not serve")]
    assert len(skipped) >= 20 - CONCURRENCY
    assert "submit it again later" in skipped[0]


async def test_a_real_image_after_missing_ones_is_still_warmed(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    """The run of failures that stops a job must be a run: a few typos do not skip the rest."""
    upstream.image("team/app", "1.0", ["linux/amd64"])
    client = await start_mirror()
    images = [f"team/missing:{n}" for n in range(MAX_FAILED_IN_A_ROW // 2)] + ["team/app:1.0"]
    job_id = await submit(client, images)

    job = await wait_job(client, job_id)

    states = {image["image"]: image["state"] for image in job["images"]}
    assert states["team/app:1.0"] == "done"
    assert not any(str(i["reason"]).startswith("not tried") for i in job["images"])
