"""Operator endpoints on the real app: probes, /metrics, and metric values moving with traffic."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from .warm_fakes import MirrorClients, WarmRegistry, serve_mirror, serve_registry

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
StartMirror = Callable[..., Awaitable[MirrorClients]]
REGISTRY = "fake.test"


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[WarmRegistry]:
    registry = await serve_registry(aiohttp_server)
    yield registry
    registry.release_all()


@pytest.fixture
def start_mirror(aiohttp_client: Any, upstream: WarmRegistry, tmp_path: Path) -> StartMirror:
    return partial(serve_mirror, aiohttp_client, tmp_path / "cache", upstream.url)


async def scrape(client: MirrorClients) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(
    client: MirrorClients, check: Callable[[Samples], bool], within: float = 10.0
) -> Samples:
    """Scrape until `check` holds: a bound on waiting, not a timing assertion."""
    deadline = time.monotonic() + within
    while True:
        samples = await scrape(client)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "the metrics never got there"
        await asyncio.sleep(0.01)


# -- probes ----------------------------------------------------------------------------------


async def test_probes_answer_and_are_not_access_logged(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    upstream.image("team/app", "1.0", ["linux/amd64"])
    with capture_logs() as logs:
        client = await start_mirror()
        healthz = await client.get("/healthz")
        readyz = await client.get("/readyz")
        head = await client.head("/readyz")
        metrics = await client.get("/metrics")
        logged = await client.get(f"/v2/team/app/manifests/1.0?ns={REGISTRY}")

    assert (healthz.status, await healthz.json()) == (200, {"status": "ok"})
    assert (readyz.status, await readyz.json()) == (
        200,
        {"status": "ok", "cache_writable": True},
    )
    assert head.status == 200 and metrics.status == 200 and logged.status == 200
    paths = [entry.get("path") for entry in logs if entry["event"] == "request"]
    assert paths == ["/v2/team/app/manifests/1.0"]  # the control is logged


@pytest.mark.parametrize("damage", ["vanished", "replaced-by-a-file"])
async def test_readyz_is_503_when_the_cache_cannot_be_written(
    start_mirror: StartMirror, tmp_path: Path, damage: str
) -> None:
    client = await start_mirror()
    cache = tmp_path / "cache"
    # Permissions would not stop root, which CI may be: take the directory away instead.
    shutil.rmtree(cache)
    if damage == "replaced-by-a-file":
        cache.write_text("not a directory")

    readyz = await client.get("/readyz")
    healthz = await client.get("/healthz")

    assert readyz.status == 503
    assert await readyz.json() == {"status": "unavailable", "cache_writable": False}
    assert healthz.status == 200  # alive: restarting would not bring the volume back


# -- /metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", "text/plain; version=0.0.4; charset=utf-8"),
        ("*/*", "text/plain; version=0.0.4; charset=utf-8"),
        (
            "application/openmetrics-text; version=1.0.0",
            "application/openmetrics-text; version=1.0.0",
        ),
    ],
)
async def test_metrics_content_type(
    start_mirror: StartMirror, accept: str, content_type: str
) -> None:
    client = await start_mirror()

    resp = await client.get("/metrics", headers={"Accept": accept} if accept else {})

    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith(content_type)
    body = await resp.text()
    assert "mirror_requests_total" in body
    assert body.endswith("# EOF\n") is content_type.startswith("application/openmetrics-text")


async def test_the_origins_ratelimit_remaining_reaches_the_gauge(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    upstream.image("team/app", "1.0", ["linux/amd64"])
    upstream.headers["ratelimit-remaining"] = "76;w=21600"
    client = await start_mirror()
    before = await scrape(client)

    resp = await client.head(f"/v2/team/app/manifests/1.0?ns={REGISTRY}")
    assert resp.status == 200

    after = await scrape(client)
    gauge = "mirror_upstream_ratelimit_remaining"
    assert (gauge, frozenset({("registry", REGISTRY)})) not in before  # no value before it said
    assert at(after, gauge, registry=REGISTRY) == 76


async def test_a_miss_then_a_hit_move_bytes_sources_and_downloads_in_flight(
    upstream: WarmRegistry, start_mirror: StartMirror
) -> None:
    image = upstream.image("team/app", "1.0", ["linux/amd64"], (200_000,))
    layer = image.platforms["linux/amd64"].blobs[1]
    size = len(upstream.blobs[layer])
    held = upstream.hold(layer)  # the origin stalls halfway through the body
    client = await start_mirror()
    path = f"/v2/team/app/blobs/{layer}?ns={REGISTRY}"
    before = await scrape(client)

    miss = await client.get(path)
    assert miss.status == 200
    await asyncio.wait_for(held.reached.wait(), 10)
    during = await scrape(client)
    held.release()
    assert await miss.read() == upstream.blobs[layer]
    after_miss = await until(client, lambda s: at(s, "mirror_downloads_in_flight") == 0)
    hit = await client.get(path)
    assert await hit.read() == upstream.blobs[layer]
    after_hit = await scrape(client)

    assert at(before, "mirror_downloads_in_flight") == 0
    assert at(during, "mirror_downloads_in_flight") == 1

    def moved(a: Samples, b: Samples, name: str, **labels: str) -> float:
        return at(b, name, **labels) - at(a, name, **labels)

    upstream_bytes = ("mirror_upstream_bytes_total", {"registry": REGISTRY})
    served_up = ("mirror_served_bytes_total", {"source": "origin"})
    served_cache = ("mirror_served_bytes_total", {"source": "disk"})
    blob_miss = ("mirror_requests_total", {"kind": "blob", "result": "miss"})
    blob_hit = ("mirror_requests_total", {"kind": "blob", "result": "hit"})
    fetched = ("mirror_upstream_requests_total", {"registry": REGISTRY, "kind": "blob"})
    changes = {
        "miss": [
            moved(before, after_miss, name, **labels)
            for name, labels in (upstream_bytes, served_up, served_cache, blob_miss, blob_hit)
        ],
        "hit": [
            moved(after_miss, after_hit, name, **labels)
            for name, labels in (upstream_bytes, served_up, served_cache, blob_miss, blob_hit)
        ],
    }
    assert changes == {"miss": [size, size, 0, 1, 0], "hit": [0, 0, size, 0, 1]}
    status = {**fetched[1], "status": "2xx"}
    assert moved(before, after_hit, fetched[0], **status) == 1  # one upstream GET for both


async def test_each_app_counts_only_its_own_traffic(
    upstream: WarmRegistry, aiohttp_client: Any, tmp_path: Path
) -> None:
    """create_app builds its metrics per app: no module-level registry two mirrors could share."""
    upstream.image("team/app", "1.0", ["linux/amd64"])
    first, second = [
        await serve_mirror(aiohttp_client, tmp_path / name, upstream.url) for name in ("a", "b")
    ]

    resp = await first.get(f"/v2/team/app/manifests/1.0?ns={REGISTRY}")
    assert resp.status == 200

    labels = {"kind": "manifest", "result": "miss"}
    assert at(await scrape(first), "mirror_requests_total", **labels) == 1
    assert at(await scrape(second), "mirror_requests_total", **labels) == 0


@pytest.mark.parametrize(
    ("max_size", "expected"),
    [
        (10_000, (10_000, 9_000, 8_000)),
        (0, (0, 0, 0)),  # unbounded: the dashboard shows no fill
    ],
)
async def test_the_cache_cap_and_watermarks_are_exported(
    start_mirror: StartMirror,
    max_size: int,
    expected: tuple[int, int, int],
) -> None:
    client = await start_mirror(max_size=max_size, high_watermark=0.9, low_watermark=0.8)

    samples = await scrape(client)

    names = ("capacity", "high_watermark", "low_watermark")
    assert tuple(at(samples, f"mirror_cache_{n}_bytes") for n in names) == expected
