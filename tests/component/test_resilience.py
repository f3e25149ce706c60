"""Outages and rate limits never fail a cached pull: stale tags within max_stale, fast 5xx (never
429) when nothing is cached, and a per-registry circuit breaker that spares a failing origin.

Breaker cooldowns and TTLs are real time (create_app wires time.monotonic and time.time), so
they are set to fractions of a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.config import Config

from .conftest import MakeMirror
from .fakeregistry import FakeRegistry, Image
from .harness import FakeClock, KiB, Mirror, closed_port, mirror_config, poll, random_bytes

FAKE = {"ns": "fake.test"}
TAG_URL = "/v2/team/app/manifests/v1"
OUTAGES = ["429", "500", "silent", "refused"]


def config(tmp_path: Path, fake: FakeRegistry, cache: dict[str, Any], **upstream: Any) -> Config:
    upstream.setdefault("header_timeout", 0.2)
    base = mirror_config(tmp_path / "cache", fake.url, **upstream)
    return replace(base, cache=replace(base.cache, **cache))


def seed(fake: FakeRegistry, tag: str = "v1") -> Image:
    return fake.add_image("team/app", tag, [random_bytes(100 * KiB, 1)])


async def break_upstream(fake: FakeRegistry, how: str) -> None:
    if how == "429":
        fake.fault("status", status=429, retry_after="30")
    elif how == "500":
        fake.fault("status", status=500)
    elif how == "silent":
        fake.fault("silent")  # never sends headers
    elif how == "refused":
        await fake.close()  # nothing listens any more: connection refused
    else:
        raise AssertionError(how)


async def scrape(mirror: Mirror, name: str, **labels: str) -> float:
    """One sample from GET /metrics, as a Prometheus server would see it."""
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


async def pull(mirror: Mirror, image: Image) -> None:
    """Tag, then config and layers by digest (what a client does); all must be served."""
    resp = await mirror.client.get(f"/v2/{image.name}/manifests/{image.tag}", params=FAKE)
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    resp = await mirror.client.get(f"/v2/{image.name}/manifests/{image.digest}", params=FAKE)
    assert await resp.read() == image.manifest
    for digest in (image.config, *image.layers):
        resp = await mirror.client.get(f"/v2/{image.name}/blobs/{digest}", params=FAKE)
        assert resp.status == 200, digest
        body = await resp.read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


async def committed(mirror: Mirror, *digests: str) -> None:
    await poll(
        lambda: all(mirror.blob_file(d).exists() for d in digests),
        what="blobs committed",
    )


def upstream_total(fake: FakeRegistry) -> int:
    return len(fake.log)


# -- stale serving -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", OUTAGES)
async def test_expired_tag_is_served_stale_while_the_upstream_fails(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, how: str, clock: FakeClock
) -> None:
    mirror = await make_mirror(config=config(tmp_path, fake, {"tag_ttl": 0.2}), clock=clock)
    image = seed(fake)
    await pull(mirror, image)
    await committed(mirror, image.config, *image.layers)
    clock.advance(0.25)  # past the TTL
    await break_upstream(fake, how)
    stale_before = await scrape(mirror, "mirror_stale_served_total", registry="fake.test")

    for method in ("GET", "HEAD"):  # skopeo GETs the tag, containerd HEADs it
        started = time.monotonic()
        resp = await mirror.client.request(method, TAG_URL, params=FAKE)
        elapsed = time.monotonic() - started
        assert resp.status == 200, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert resp.headers["Content-Length"] == str(len(image.manifest))
        assert await resp.read() == (image.manifest if method == "GET" else b"")
        assert elapsed < 2.0, f"{method} took {elapsed:.2f}s"

    stale = await scrape(mirror, "mirror_stale_served_total", registry="fake.test")
    assert stale == stale_before + 2
    assert mirror.requests("manifest", "stale") == 2
    # The rest of the image is content by digest: served without asking the upstream at all.
    asked = upstream_total(fake)
    await pull(mirror, image)
    assert all(r.kind == "manifest-tag" for r in fake.log[asked:])  # the tag may try again


async def test_revalidation_waits_at_most_revalidate_timeout(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    """An upstream that never answers costs a cached tag revalidate_timeout, not the (longer)
    header deadline of the upstream client."""
    cfg = config(tmp_path, fake, {"tag_ttl": 0.1, "revalidate_timeout": 0.3}, header_timeout=5.0)
    mirror = await make_mirror(config=cfg, clock=clock)
    image = seed(fake)
    await pull(mirror, image)
    clock.advance(0.15)  # past the TTL
    fake.fault("silent", kind="manifest-tag")
    started = time.monotonic()
    resp = await mirror.client.head(TAG_URL, params=FAKE)
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert 0.25 < elapsed < 1.5, f"took {elapsed:.2f}s"
    assert await scrape(mirror, "mirror_stale_served_total", registry="fake.test") == 1


@pytest.mark.parametrize("how", ["429", "refused"])  # an upstream answer, and none at all
async def test_tag_older_than_max_stale_is_not_served(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, how: str, clock: FakeClock
) -> None:
    # max_stale is judged when the revalidation gives up (after the retries of a refused
    # connection, whose backoff moves the clock too), so both sides are well clear of it.
    cfg = config(tmp_path, fake, {"tag_ttl": 10.0, "max_stale": 100.0})
    mirror = await make_mirror(config=cfg, clock=clock)
    image = seed(fake)
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    assert resp.status == 200
    await break_upstream(fake, how)

    clock.advance(15)  # past the TTL, within max_stale: stale
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    assert resp.status == 200
    assert await resp.read() == image.manifest

    clock.advance(90)  # past max_stale
    started = time.monotonic()
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    elapsed = time.monotonic() - started
    assert resp.status == 503, await resp.text()  # a 5xx every client falls back from
    assert resp.status != 429
    assert "errors" in await resp.json()
    assert elapsed < 2.0, f"took {elapsed:.2f}s"
    assert mirror.requests("manifest", "stale") == 1


async def test_revalidation_timeout_past_max_stale_is_a_503(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    cache = {"tag_ttl": 0.1, "max_stale": 0.2, "revalidate_timeout": 0.2}
    mirror = await make_mirror(
        config=config(tmp_path, fake, cache, header_timeout=5.0), clock=clock
    )
    seed(fake)
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    assert resp.status == 200
    clock.advance(0.3)  # past max_stale
    fake.fault("silent", kind="manifest-tag")
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    assert (resp.status, (await resp.json())["errors"][0]["code"]) == (503, "UNAVAILABLE")


# -- nothing cached --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", OUTAGES)
async def test_nothing_cached_is_a_fast_5xx_never_429(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, how: str
) -> None:
    mirror = await make_mirror(config=config(tmp_path, fake, {}))
    image = seed(fake)
    await break_upstream(fake, how)
    for path in (
        TAG_URL,
        f"/v2/team/app/manifests/{image.digest}",
        f"/v2/team/app/blobs/{image.layers[0]}",
    ):
        for method in ("GET", "HEAD"):
            started = time.monotonic()
            resp = await mirror.client.request(method, path, params=FAKE)
            elapsed = time.monotonic() - started
            assert resp.status == 503, (method, path, resp.status)
            assert elapsed < 2.0, f"{method} {path} took {elapsed:.2f}s"
            if method == "GET":
                doc = await resp.json()
                assert doc["errors"][0]["code"] == "UNAVAILABLE"
    assert mirror.requests("manifest", "error") == 4


# -- 429: a hold on one kind of request ----------------------------------------------------------


async def held(mirror: Mirror, kind: str) -> float:
    """Seconds left of fake.test's Retry-After hold on this kind of request."""
    return await scrape(mirror, "mirror_upstream_hold_seconds", registry="fake.test", kind=kind)


async def test_429_retry_after_holds_the_origin_off_and_stale_answers_meanwhile(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    mirror = await make_mirror(config=config(tmp_path, fake, {"tag_ttl": 0.1}), clock=clock)
    image = seed(fake)
    await pull(mirror, image)
    clock.advance(0.15)  # past the TTL
    fake.reset_log()
    fake.fault("status", status=429, retry_after="1", times=1)
    for _ in range(3):
        resp = await mirror.client.head(TAG_URL, params=FAKE)
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image.digest
    assert fake.count() == 1  # the 429; while Retry-After runs, no tag HEAD goes out
    assert await scrape(mirror, "mirror_upstream_throttled_total", registry="fake.test") == 1
    assert 0 < await held(mirror, "manifest_head") <= 1
    # A limit, not an outage: the breaker is closed, and other kinds are not held.
    assert await scrape(mirror, "mirror_upstream_breaker_open", registry="fake.test") == 0
    assert await held(mirror, "blob") == 0
    assert await scrape(mirror, "mirror_stale_served_total", registry="fake.test") == 3

    clock.advance(1.05)  # the Retry-After is over
    resp = await mirror.client.head(TAG_URL, params=FAKE)
    assert resp.status == 200
    assert [(r.method, r.kind, r.status) for r in fake.log[1:]] == [("HEAD", "manifest-tag", 200)]
    assert mirror.requests("manifest", "revalidated") == 1
    assert await held(mirror, "manifest_head") == 0


async def test_a_429_on_manifest_gets_holds_only_manifest_gets(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Docker Hub counts manifest GETs: its limit must not stop blobs, nor the (free) tag HEADs
    that revalidate cached tags."""
    mirror = await make_mirror(config=config(tmp_path, fake, {"tag_ttl": 0.0}))
    image = seed(fake)
    resp = await mirror.client.get(TAG_URL, params=FAKE)  # cached: every later ask revalidates
    assert resp.status == 200
    fresh = fake.add_image("team/app", "v2", [random_bytes(50 * KiB, 2)])
    fake.fault("status", status=429, retry_after="60", method="GET", kind="manifest-tag")
    resp = await mirror.client.get("/v2/team/app/manifests/v2", params=FAKE)
    assert (resp.status, resp.headers["Retry-After"]) == (503, "60")
    fake.reset_log()

    # Held: a manifest GET by an uncached digest is refused at once, without asking.
    started = time.monotonic()
    resp = await mirror.client.get(f"/v2/team/app/manifests/{fresh.digest}", params=FAKE)
    assert time.monotonic() - started < 0.5
    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert 58 <= int(resp.headers["Retry-After"]) <= 60
    assert fake.log == []
    # Not held: an uncached blob ...
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 200
    assert hashlib.sha256(await resp.read()).hexdigest() == image.layers[0].removeprefix("sha256:")
    # ... and the revalidation of a cached tag, by HEAD.
    resp = await mirror.client.head(TAG_URL, params=FAKE)
    assert (resp.status, resp.headers["Docker-Content-Digest"]) == (200, image.digest)
    assert mirror.requests("manifest", "revalidated") == 1
    assert [(r.method, r.kind, r.status) for r in fake.log if r.kind != "blob"] == [
        ("HEAD", "manifest-tag", 200)
    ]
    assert await scrape(mirror, "mirror_upstream_breaker_open", registry="fake.test") == 0


# -- the circuit breaker -------------------------------------------------------------------------


async def breaker_opened(mirror: Mirror, registry: str = "fake.test") -> None:
    """Until the gauge shows it open: the probe that decides runs in the background."""
    await poll(
        lambda: mirror.metric("mirror_upstream_breaker_open", registry=registry) == 1,
        what=f"the breaker for {registry} to open",
    )


@pytest.mark.parametrize("repeats", [2, 20])
async def test_one_failing_request_repeated_never_opens_the_breaker(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, repeats: int
) -> None:
    """Distribution answers 500 to a manifest GET by a layer's digest: one client asking for
    that again and again must not turn the registry off for everyone else."""
    cfg = config(tmp_path, fake, {}, breaker_failures=2)  # retries=2: 3 attempts each
    mirror = await make_mirror(config=cfg)
    image = seed(fake)
    layer = image.layers[0]
    fake.fault("status", status=500, kind="manifest-digest", ref=layer)
    for _ in range(repeats):
        resp = await mirror.client.get(f"/v2/team/app/manifests/{layer}", params=FAKE)
        assert resp.status == 503
    assert fake.count("manifest-digest") == 3 * repeats
    assert fake.count("base") == 0  # never even in doubt
    assert mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 0
    await pull(mirror, image)  # everyone else is served


async def test_many_failing_requests_from_a_live_origin_do_not_open_the_breaker(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Different requests failing while the origin answers its own ping: a client asking for
    every layer of an image as a manifest, say. The breaker asks the origin once, and stays
    closed."""
    mirror = await make_mirror(config=config(tmp_path, fake, {}, retries=0, breaker_failures=3))
    image = fake.add_image("team/app", "v1", [random_bytes(KiB, n) for n in range(6)])
    fake.fault("status", status=500, kind="manifest-digest")
    for layer in image.layers:
        resp = await mirror.client.get(f"/v2/team/app/manifests/{layer}", params=FAKE)
        assert resp.status == 503
    await poll(lambda: fake.count("base") == 1, what="the probe of the origin")
    await asyncio.sleep(0.05)  # its answer is in
    assert mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 0
    assert fake.count("base") == 1  # once: not again for every further failure
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    assert resp.status == 200


async def test_breaker_opens_when_many_requests_and_the_origin_fail_and_closes_after_cooldown(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    cooldown = 0.5
    cfg = config(tmp_path, fake, {}, retries=0, breaker_failures=3, breaker_cooldown=cooldown)
    mirror = await make_mirror(config=cfg, clock=clock)
    image = seed(fake)
    fake.fault("status", status=500)  # everything, its ping included
    for tag in ("a", "b", "c"):
        resp = await mirror.client.get(f"/v2/team/app/manifests/{tag}", params=FAKE)
        assert resp.status == 503
    await breaker_opened(mirror)
    assert fake.count() == 4  # three tags, then one ping of the origin
    assert fake.count("base") == 1

    # Open: anything for this registry fails fast, without reaching the upstream.
    for path in (TAG_URL, f"/v2/team/app/blobs/{image.layers[0]}"):
        started = time.monotonic()
        resp = await mirror.client.get(path, params=FAKE)
        assert resp.status == 503
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
        assert "Retry-After" in resp.headers
        assert time.monotonic() - started < 0.2
    assert fake.count() == 4
    # The breaker is per registry: docker.io (same fake behind it) is still asked.
    resp = await mirror.client.get("/v2/docker.io/team/app/manifests/v1")
    assert resp.status == 503
    assert fake.count() == 5
    assert await scrape(mirror, "mirror_upstream_breaker_open", registry="docker.io") == 0

    # After the cooldown one request goes through; its success closes the breaker. The gauge
    # drops with the clock, before that request: dashboards must not show a stuck breaker.
    fake.clear_faults()
    clock.advance(cooldown + 0.05)
    assert await scrape(mirror, "mirror_upstream_breaker_open", registry="fake.test") == 0
    asked = fake.count()
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert fake.count() == asked + 1
    assert await scrape(mirror, "mirror_upstream_breaker_open", registry="fake.test") == 0
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 200


async def test_a_dead_origin_fails_fast_after_the_threshold(
    make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Refused connections are no request's doing: each attempt counts, no probe is needed."""
    cfg = mirror_config(tmp_path / "cache", f"http://127.0.0.1:{closed_port()}", breaker_failures=5)
    mirror = await make_mirror(config=cfg)
    digest = "sha256:" + "ab" * 32
    resp = await mirror.client.get(TAG_URL, params=FAKE)  # retries=2: three refused attempts
    assert resp.status == 503
    resp = await mirror.client.get(f"/v2/team/app/blobs/{digest}", params=FAKE)  # two more
    assert resp.status == 503
    assert mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 1
    for path in (TAG_URL, f"/v2/team/app/manifests/{digest}", f"/v2/team/app/blobs/{digest}"):
        started = time.monotonic()
        resp = await mirror.client.get(path, params=FAKE)
        assert time.monotonic() - started < 0.05  # no attempt, no backoff
        error = (await resp.json())["errors"][0]
        assert (resp.status, error["code"]) == (503, "UNAVAILABLE")
        assert error["message"].startswith("fake.test is failing; next try in ")
    errors = mirror.metric(
        "mirror_upstream_requests_total", registry="fake.test", kind="blob", status="error"
    )
    assert errors == 2  # the second request's last attempt was refused by the breaker


async def test_breaker_reopens_when_the_trial_request_fails(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    cooldown = 0.3
    cfg = config(tmp_path, fake, {}, retries=0, breaker_failures=2, breaker_cooldown=cooldown)
    mirror = await make_mirror(config=cfg, clock=clock)
    seed(fake)
    fake.fault("status", status=503)
    for tag in ("a", "b"):
        await mirror.client.get(f"/v2/team/app/manifests/{tag}", params=FAKE)
    await breaker_opened(mirror)
    clock.advance(cooldown + 0.05)
    resp = await mirror.client.get(TAG_URL, params=FAKE)  # the trial: reaches the origin
    assert resp.status == 503
    await breaker_opened(mirror)  # the origin's ping failed again: open for another cooldown
    assert [r.kind for r in fake.log] == ["manifest-tag", "manifest-tag", "base"] + [
        "manifest-tag", "base"
    ]  # fmt: skip
    resp = await mirror.client.get(TAG_URL, params=FAKE)
    assert resp.status == 503
    assert fake.count() == 5


async def test_open_breaker_still_serves_cached_pulls_without_upstream_requests(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    cfg = config(tmp_path, fake, {"tag_ttl": 0.1}, retries=0, breaker_failures=2)
    mirror = await make_mirror(config=cfg, clock=clock)
    image = seed(fake)
    await pull(mirror, image)
    await committed(mirror, image.config, *image.layers)
    fake.fault("status", status=500)
    for tag in ("other1", "other2"):  # uncached tags, then the origin's ping: all fail
        resp = await mirror.client.get(f"/v2/team/app/manifests/{tag}", params=FAKE)
        assert resp.status == 503
    await breaker_opened(mirror)
    clock.advance(0.15)  # the cached tag's TTL is over too
    asked = fake.count()
    started = time.monotonic()
    await pull(mirror, image)
    assert time.monotonic() - started < 1.0
    assert fake.count() == asked
    assert mirror.requests("manifest", "stale") == 1
