"""The mirror's collectors: names, labels, values moving, and no shared state."""

from __future__ import annotations

from typing import Any

import prometheus_client
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from mirror.metrics import (
    DURATION_BUCKETS,
    REQUEST_KINDS,
    REQUEST_RESULTS,
    SERVED_SOURCES,
    UPSTREAM_KINDS,
    Metrics,
    RequestMetrics,
    status_class,
)

# attribute, family name in the exposition, type, labels used to touch it
COLLECTORS: list[tuple[str, str, str, dict[str, str]]] = [
    ("requests", "mirror_requests", "counter", {"kind": "manifest", "result": "hit"}),
    ("requests", "mirror_request_duration_seconds", "histogram", {"kind": "blob"}),
    ("served_bytes", "mirror_served_bytes", "counter", {"source": "disk"}),
    ("upstream_requests", "mirror_upstream_requests", "counter",
     {"registry": "docker.io", "kind": "blob", "status": "2xx"}),
    ("upstream_bytes", "mirror_upstream_bytes", "counter", {"registry": "docker.io"}),
    ("upstream_throttled", "mirror_upstream_throttled", "counter", {"registry": "docker.io"}),
    ("ratelimit_remaining", "mirror_upstream_ratelimit_remaining", "gauge",
     {"registry": "docker.io"}),
    ("breaker_open", "mirror_upstream_breaker_open", "gauge", {"registry": "docker.io"}),
    ("hold", "mirror_upstream_hold_seconds", "gauge", {"registry": "docker.io", "kind": "blob"}),
    ("stale_served", "mirror_stale_served", "counter", {"registry": "docker.io"}),
    ("cache_bytes", "mirror_cache_bytes", "gauge", {}),
    ("cache_entries", "mirror_cache_entries", "gauge", {}),
    ("cache_capacity", "mirror_cache_capacity_bytes", "gauge", {}),
    ("cache_high_watermark", "mirror_cache_high_watermark_bytes", "gauge", {}),
    ("cache_low_watermark", "mirror_cache_low_watermark_bytes", "gauge", {}),
    ("evictions", "mirror_cache_evictions", "counter", {}),
    ("evicted_bytes", "mirror_cache_evicted_bytes", "counter", {}),
    ("downloads_in_flight", "mirror_downloads_in_flight", "gauge", {}),
    ("digest_mismatches", "mirror_digest_mismatches", "counter", {"registry": "docker.io"}),
    ("cache_write_failures", "mirror_cache_write_failures", "counter", {"reason": "enospc"}),
    ("warm_jobs", "mirror_warm_jobs", "counter", {"state": "done"}),
    ("s3_requests", "mirror_s3_requests", "counter", {"operation": "get_object", "result": "ok"}),
    ("s3_uploads", "mirror_s3_uploads", "counter", {"result": "done"}),
    ("s3_breaker_open", "mirror_s3_breaker_open", "gauge", {}),
    ("peer_requests", "mirror_peer_requests", "counter", {"direction": "sent", "result": "ok"}),
    ("peers", "mirror_peers", "gauge", {"state": "up"}),
    ("connections_open", "mirror_connections_open", "gauge", {}),
    ("connections_limit", "mirror_connections_limit", "gauge", {}),
    ("connections_dropped", "mirror_connections_dropped", "counter", {"reason": "limit"}),
]  # fmt: skip


def families(metrics: Metrics, accept: str = "") -> dict[str, Metric]:
    body, _ = metrics.render(accept)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(metrics: Metrics, sample: str, **labels: str) -> float | None:
    for family in families(metrics).values():
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    return None


def touch(metric: Any, labels: dict[str, str], amount: float) -> None:
    if isinstance(metric, RequestMetrics):  # both request families share one collector
        metric.count(labels["kind"], labels.get("result", "hit"))
        metric.observe(labels["kind"], amount)
        return
    child = metric.labels(**labels) if labels else metric
    if hasattr(child, "observe"):
        child.observe(amount)
    elif hasattr(child, "set"):
        child.set(amount)
    else:
        child.inc(amount)


@pytest.mark.parametrize(("attr", "name", "kind", "labels"), COLLECTORS)
def test_each_collector_is_exposed_with_its_name_type_and_labels(
    attr: str, name: str, kind: str, labels: dict[str, str]
) -> None:
    m = Metrics()
    touch(getattr(m, attr), labels, 3)
    family = families(m)[name]
    assert family.type == kind
    assert any(s.labels == labels for s in family.samples if not s.name.endswith("_bucket"))


def test_the_table_covers_every_collector() -> None:
    m = Metrics()
    exposed = {f.name for f in m.registry.collect()}
    assert exposed == {name for _, name, _, _ in COLLECTORS}
    assert all(name.startswith("mirror_") for name in exposed)


@pytest.mark.parametrize(
    ("max_size", "high", "low", "expected"),
    [
        (1000, 0.9, 0.8, (1000, 900, 800)),
        (900 * 1024**3, 0.95, 0.5, (900 * 1024**3, int(900 * 1024**3 * 0.95), 450 * 1024**3)),
        (0, 0.9, 0.8, (0, 0, 0)),  # unbounded: no fill fraction, no thresholds
    ],
)
def test_cache_limits_are_exported_in_bytes(
    max_size: int, high: float, low: float, expected: tuple[int, int, int]
) -> None:
    m = Metrics()
    m.track_cache_limits(max_size, high, low)
    assert (
        value(m, "mirror_cache_capacity_bytes"),
        value(m, "mirror_cache_high_watermark_bytes"),
        value(m, "mirror_cache_low_watermark_bytes"),
    ) == expected


def test_histogram_buckets_span_fast_hits_and_long_blobs() -> None:
    m = Metrics()
    m.requests.observe("manifest", 0.0004)
    m.requests.observe("blob", 450.0)

    assert value(m, "mirror_request_duration_seconds_bucket", kind="manifest", le="0.0005") == 1
    assert value(m, "mirror_request_duration_seconds_bucket", kind="blob", le="300.0") == 0
    assert value(m, "mirror_request_duration_seconds_bucket", kind="blob", le="600.0") == 1
    assert value(m, "mirror_request_duration_seconds_count", kind="blob") == 1


def test_closed_label_sets_exist_at_zero_before_any_event() -> None:
    m = Metrics()
    for kind in REQUEST_KINDS:
        for result in REQUEST_RESULTS:
            assert value(m, "mirror_requests_total", kind=kind, result=result) == 0
        assert value(m, "mirror_request_duration_seconds_count", kind=kind) == 0
    for source in SERVED_SOURCES:
        assert value(m, "mirror_served_bytes_total", source=source) == 0


def test_track_registries_creates_per_registry_series() -> None:
    m = Metrics()
    m.track_registries(["docker.io", "ghcr.io"])
    for registry in ("docker.io", "ghcr.io"):
        assert value(m, "mirror_upstream_bytes_total", registry=registry) == 0
        assert value(m, "mirror_upstream_throttled_total", registry=registry) == 0
        assert value(m, "mirror_stale_served_total", registry=registry) == 0
        assert value(m, "mirror_digest_mismatches_total", registry=registry) == 0
        # 0 would claim the origin's limit is exhausted before it said anything
        assert value(m, "mirror_upstream_ratelimit_remaining", registry=registry) is None


def test_breaker_gauge_reads_the_breaker_at_scrape_time() -> None:
    m = Metrics()
    open_now = {"docker.io"}
    m.watch_breakers(["docker.io", "ghcr.io"], lambda name: name in open_now)
    assert value(m, "mirror_upstream_breaker_open", registry="docker.io") == 1
    assert value(m, "mirror_upstream_breaker_open", registry="ghcr.io") == 0
    open_now.clear()  # a cooldown ran out: no event, and the next scrape says closed
    assert value(m, "mirror_upstream_breaker_open", registry="docker.io") == 0


def test_the_global_default_registry_is_never_used() -> None:
    Metrics()
    names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("mirror_") for n in names)


def test_per_registry_series_only_for_the_registries_given() -> None:
    m = Metrics()
    m.track_registries(["docker.io"])
    m.watch_breakers(["docker.io"], lambda name: False)
    registries = {
        s.labels["registry"]
        for family in families(m).values()
        for s in family.samples
        if "registry" in s.labels
    }
    assert registries == {"docker.io"}  # nothing created for registries nobody configured


def test_render_content_types() -> None:
    m = Metrics()
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    assert b"mirror_requests_total" in body
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "2xx"), (206, "2xx"), (307, "3xx"), (401, "4xx"), (404, "4xx"), (429, "429"),
        (500, "5xx"), (503, "5xx"), (None, "error"), (0, "error"), (99, "error"), (600, "error"),
    ],
)  # fmt: skip
def test_status_class(status: int | None, expected: str) -> None:
    assert status_class(status) == expected


EVENTS = [
    [],
    [("manifest", "hit", 0.0001)],
    [("manifest", "hit", 0.0005), ("manifest", "hit", 0.0006), ("blob", "miss", 0.7)],
    [("blob", "coalesced", 700.0), ("tags", "miss", 0.001), ("other", "teapot", 601.0)],
    [("manifest", "hit", 600.0), ("manifest", None, 0.0025), ("blob", "hit", 0.0)],
]


@pytest.mark.parametrize("events", EVENTS)
def test_request_metrics_expose_what_a_counter_and_histogram_would(
    events: list[tuple[str, str | None, float]],
) -> None:
    """The reference: prometheus-client's own Counter and Histogram, fed the same events and
    created in the same order (closed sets first), on a registry of their own."""
    ours = RequestMetrics()
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter(
        "mirror_requests", "Client requests by kind and how they were answered.",
        ["kind", "result"], registry=registry,
    )  # fmt: skip
    histogram = prometheus_client.Histogram(
        "mirror_request_duration_seconds", "Time to answer a client request, body included.",
        ["kind"], buckets=DURATION_BUCKETS, registry=registry,
    )  # fmt: skip
    for kind in REQUEST_KINDS:
        histogram.labels(kind)
        for result in REQUEST_RESULTS:
            counter.labels(kind, result)
    for kind, result, seconds in events:
        ours.observe(kind, seconds)
        histogram.labels(kind).observe(seconds)
        if result is not None:  # the middleware counts answered requests only
            ours.count(kind, result)
            counter.labels(kind, result).inc()
    mine = prometheus_client.CollectorRegistry()
    mine.register(ours)
    for encoder in (generate_latest, generate_openmetrics):
        assert _exposed(encoder(mine)) == _exposed(encoder(registry))


def _exposed(body: bytes) -> list[str]:
    """Every line, with the value of each _created sample (a timestamp) blanked."""
    return [
        line.rsplit(" ", 1)[0] if "_created{" in line else line
        for line in body.decode().splitlines()
    ]


def test_a_second_collector_of_the_same_name_is_refused() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="Duplicated"):
        prometheus_client.Counter("mirror_requests", "again", registry=m.registry)


def test_hold_gauge_reads_each_kind_at_scrape_time() -> None:
    m = Metrics()
    left = {("docker.io", "manifest"): 42.0}
    m.watch_holds(["docker.io"], lambda name, kind: left.get((name, kind), 0.0))
    assert value(m, "mirror_upstream_hold_seconds", registry="docker.io", kind="manifest") == 42
    for kind in UPSTREAM_KINDS[1:]:  # one series per kind, each its own
        assert value(m, "mirror_upstream_hold_seconds", registry="docker.io", kind=kind) == 0
    left.clear()
    assert value(m, "mirror_upstream_hold_seconds", registry="docker.io", kind="manifest") == 0
