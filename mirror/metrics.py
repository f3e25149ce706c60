"""Every Prometheus collector the mirror exports, on one injected registry."""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Label values are closed sets so that every series is known up front and cardinality cannot
# grow with traffic. Repository, tag and digest never become labels.
REQUEST_KINDS: tuple[str, ...] = ("manifest", "blob", "tags", "other")
REQUEST_RESULTS: tuple[str, ...] = (
    "hit", "miss", "coalesced", "stale", "revalidated", "not_found", "error",
)  # fmt: skip
# disk: the local cache; s3: a fill from the region's bucket; peer: from the replica that owns
# the digest; origin: from the registry; redirect: sent to the bucket by a presigned URL.
SERVED_SOURCES: tuple[str, ...] = ("disk", "s3", "peer", "origin", "redirect")
S3_UPLOAD_RESULTS: tuple[str, ...] = ("queued", "done", "failed", "skipped", "dropped")
# The kinds of request the mirror makes to an origin; a 429 holds one kind, not the registry.
UPSTREAM_KINDS: tuple[str, ...] = ("manifest", "manifest_head", "blob", "blob_head", "tags")
# Why the server ended a client connection itself: refused at the cap, or no request head in
# time (server.max_connections, server.header_timeout).
DROP_REASONS: tuple[str, ...] = ("limit", "header_timeout")

# One histogram covers a cached tag HEAD (well under a millisecond) and a cold multi-GB blob
# (minutes), so the buckets are roughly logarithmic from 0.5 ms to 10 min.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
_BOUNDS = (*DURATION_BUCKETS, math.inf)
# Formatted by prometheus-client itself, so the le labels are the ones a Histogram would show.
_BUCKET_LABELS = tuple(floatToGoString(b) for b in _BOUNDS)  # type: ignore[no-untyped-call]


def status_class(status: int | None) -> str:
    """The `status` label for an upstream answer: "2xx".."5xx", "429" apart, "error" for none.

    429 gets its own value because throttling is what operators watch; None (no HTTP answer:
    timeout, reset, DNS) and nonsense codes are "error".
    """
    if status is None or not 100 <= status <= 599:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


class Metrics:
    """The mirror's collectors. One instance per app: nothing touches the global registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        self.requests = RequestMetrics()
        r.register(self.requests)
        self.served_bytes = Counter(
            "mirror_served_bytes_total",
            "Body bytes sent to clients, by where they came from.",
            ["source"],
            registry=r,
        )

        self.upstream_requests = Counter(
            "mirror_upstream_requests_total",
            "Requests to origin registries by status class.",
            ["registry", "kind", "status"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes_total",
            "Body bytes received from origin registries.",
            ["registry"],
            registry=r,
        )
        self.upstream_throttled = Counter(
            "mirror_upstream_throttled_total",
            "429 answers from origins absorbed by the mirror.",
            ["registry"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Last ratelimit-remaining value an origin reported (Docker Hub pulls left).",
            ["registry"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "mirror_upstream_breaker_open",
            "1 while the circuit breaker for an origin is open (the origin is failing).",
            ["registry"],
            registry=r,
        )
        self.hold = Gauge(
            "mirror_upstream_hold_seconds",
            "Seconds left of an origin's Retry-After for one kind of request (0: none).",
            ["registry", "kind"],
            registry=r,
        )
        self.stale_served = Counter(
            "mirror_stale_served_total",
            "Tags answered from an expired record because the origin could not be asked.",
            ["registry"],
            registry=r,
        )
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches_total",
            "Downloads discarded because the digest differed.",
            ["registry"],
            registry=r,
        )

        self.cache_bytes = Gauge("mirror_cache_bytes", "Bytes held in the local cache.", registry=r)
        # The limits come from config and never change, but a dashboard can only show fill as a
        # fraction, or the eviction thresholds as lines, if they are series too.
        self.cache_capacity, self.cache_high_watermark, self.cache_low_watermark = (
            Gauge(name, f"{what}, in bytes; 0 when the cache is unbounded.", registry=r)
            for name, what in (
                ("mirror_cache_capacity_bytes", "The cache's size cap (cache.max_size)"),
                ("mirror_cache_high_watermark_bytes", "Cache size above which eviction starts"),
                ("mirror_cache_low_watermark_bytes", "Cache size eviction brings it back down to"),
            )
        )
        self.cache_entries = Gauge(
            "mirror_cache_entries", "Blobs and manifests held in the local cache.", registry=r
        )
        self.evictions = Counter(
            "mirror_cache_evictions_total",
            "Entries evicted to stay under the size cap.",
            registry=r,
        )
        self.evicted_bytes = Counter(
            "mirror_cache_evicted_bytes_total",
            "Bytes evicted to stay under the size cap.",
            registry=r,
        )
        self.cache_write_failures = Counter(
            "mirror_cache_write_failures_total",
            "Fills passed through uncached because the cache could not be written.",
            ["reason"],
            registry=r,
        )
        self.downloads_in_flight = Gauge(
            "mirror_downloads_in_flight", "Upstream downloads currently running.", registry=r
        )
        self.s3_requests = Counter(
            "mirror_s3_requests_total",
            "Calls to the S3 level by operation and how they ended (ok, missing, lost_race, "
            "error).",
            ["operation", "result"],
            registry=r,
        )
        self.s3_uploads = Counter(
            "mirror_s3_uploads_total",
            "Background copies of blobs to the S3 level, by outcome.",
            ["result"],
            registry=r,
        )
        self.peer_requests = Counter(
            "mirror_peer_requests_total",
            "Requests between replicas: sent to a digest's owner, or served for a peer.",
            ["direction", "result"],
            registry=r,
        )
        self.peers = Gauge(
            "mirror_peers", "Replicas in the ring, by whether this one sees them up.",
            ["state"], registry=r,
        )  # fmt: skip
        self.s3_breaker_open = Gauge(
            "mirror_s3_breaker_open", "1 while the S3 level's circuit breaker is open.", registry=r
        )
        self.connections_open = Gauge(
            "mirror_connections_open", "Client connections open now.", registry=r
        )
        self.connections_limit = Gauge(
            "mirror_connections_limit",
            "Client connections the mirror admits at once (server.max_connections, lowered "
            "to what the descriptor limit allows).",
            registry=r,
        )
        self.connections_dropped = Counter(
            "mirror_connections_dropped_total",
            "Client connections the mirror ended itself: refused at the limit, or closed "
            "for sending no complete request head in time.",
            ["reason"],
            registry=r,
        )
        self.warm_jobs = Counter(
            "mirror_warm_jobs_total",
            "Warm jobs by the state they reached.",
            ["state"],
            registry=r,
        )

        # Create the closed-set series at zero so rate() and ratios have data from the first
        # scrape instead of appearing only after the first event of each kind.
        for source in SERVED_SOURCES:
            self.served_bytes.labels(source=source)
        for reason in DROP_REASONS:
            self.connections_dropped.labels(reason=reason)

    def track_registries(self, names: Iterable[str]) -> None:
        """Create each configured registry's series at zero (call once, from the app root).

        The ratelimit gauge is left out on purpose: 0 would read as "exhausted" before the
        origin has said anything.
        """
        for name in names:
            self.upstream_bytes.labels(registry=name)
            self.upstream_throttled.labels(registry=name)
            self.stale_served.labels(registry=name)
            self.digest_mismatches.labels(registry=name)

    def track_cache_limits(
        self, max_size: int, high_watermark: float, low_watermark: float
    ) -> None:
        """Export the size cap and the eviction watermarks, in bytes (call once, from the app
        root, with cache.max_size and its two fractions)."""
        self.cache_capacity.set(max_size)
        self.cache_high_watermark.set(int(max_size * high_watermark))
        self.cache_low_watermark.set(int(max_size * low_watermark))

    def watch_breakers(self, names: Iterable[str], is_open: Callable[[str], bool]) -> None:
        """Read each registry's breaker at scrape time: an open breaker closes by the clock
        alone (its cooldown runs out), with no event that could update a stored value."""
        for name in names:
            self.breaker_open.labels(registry=name).set_function(partial(_as_float, is_open, name))

    def watch_peers(self, count: Callable[[], int], down: Callable[[], int]) -> None:
        """The ring's membership, read at scrape time (peers come back by the clock alone)."""
        self.peers.labels("up").set_function(lambda: float(count() - down()))
        self.peers.labels("down").set_function(lambda: float(down()))
        for direction, result in (("sent", "ok"), ("sent", "error"), ("served", "ok")):
            self.peer_requests.labels(direction, result)

    def watch_s3(self, is_open: Callable[[], bool]) -> None:
        """The S3 level's breaker, read at scrape time (it closes by the clock alone)."""
        self.s3_breaker_open.set_function(lambda: 1.0 if is_open() else 0.0)
        for result in S3_UPLOAD_RESULTS:
            self.s3_uploads.labels(result)

    def watch_holds(self, names: Iterable[str], held_for: Callable[[str, str], float]) -> None:
        """Read each registry's Retry-After holds at scrape time, per kind of request."""
        for name in names:
            for kind in UPSTREAM_KINDS:
                self.hold.labels(registry=name, kind=kind).set_function(
                    partial(held_for, name, kind)
                )

    def watch_connections(self, count: Callable[[], int], limit: int) -> None:
        """The open-connection gauge reads `count` at scrape time (call once, from serve)."""
        self.connections_open.set_function(lambda: float(count()))
        self.connections_limit.set(limit)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its Content-Type; OpenMetrics when `accept` asks for it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class RequestMetrics:
    """mirror_requests_total and mirror_request_duration_seconds, for both request paths.

    Kept in plain numbers and read as they are at scrape time (a custom collector), because
    prometheus-client's Counter and Histogram take a lock per increment and walk the buckets
    per observation: about a tenth of the manifest fast path's time per request. Everything
    runs on the event loop, so plain numbers need no lock. The exposition is the one a Counter
    and a Histogram with these names and labels would give (tests/unit/test_metrics.py).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: dict[tuple[str, str], RequestCount] = {}
        self._durations: dict[str, Durations] = {}
        # Closed label sets exist at zero from the start, so rate() and ratios have data from
        # the first scrape instead of appearing only after the first event of each kind.
        for kind in REQUEST_KINDS:
            self.durations(kind)
            for result in REQUEST_RESULTS:
                self.counter(kind, result)

    def counter(self, kind: str, result: str) -> RequestCount:
        found = self._counts.get((kind, result))
        if found is None:
            found = self._counts[kind, result] = RequestCount(self._clock())
        return found

    def durations(self, kind: str) -> Durations:
        found = self._durations.get(kind)
        if found is None:
            found = self._durations[kind] = Durations(self._clock())
        return found

    def count(self, kind: str, result: str) -> None:
        self.counter(kind, result).value += 1

    def observe(self, kind: str, seconds: float) -> None:
        self.durations(kind).observe(seconds)

    def describe(self) -> Iterator[Metric]:
        """The two families without samples: lets the registry refuse a second of either name."""
        yield self._requests_family()
        yield self._durations_family()

    def collect(self) -> Iterator[Metric]:
        requests = self._requests_family()
        for (kind, result), count in self._counts.items():
            requests.add_metric((kind, result), count.value, created=count.created)
        yield requests
        durations = self._durations_family()
        for kind, histogram in self._durations.items():
            cumulative = list(itertools.accumulate(histogram.buckets))
            durations.add_metric(
                (kind,), list(zip(_BUCKET_LABELS, cumulative, strict=True)), histogram.sum
            )
            durations.add_sample(
                "mirror_request_duration_seconds_created", {"kind": kind}, histogram.created
            )
        yield durations

    @staticmethod
    def _requests_family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "mirror_requests",
            "Client requests by kind and how they were answered.",
            labels=("kind", "result"),
        )

    @staticmethod
    def _durations_family() -> HistogramMetricFamily:
        return HistogramMetricFamily(
            "mirror_request_duration_seconds",
            "Time to answer a client request, body included.",
            labels=("kind",),
        )


@dataclass(slots=True)
class RequestCount:
    created: float
    value: int = 0


@dataclass(slots=True)
class Durations:
    """One histogram's samples: how many fell in each bucket (not cumulative) and their sum."""

    created: float
    buckets: list[int] = field(default_factory=lambda: [0] * len(_BOUNDS))
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        # Prometheus buckets hold values <= their bound: the first bound not below the value.
        self.buckets[bisect.bisect_left(_BOUNDS, seconds)] += 1
        self.sum += seconds


def _as_float(predicate: Callable[[str], bool], name: str) -> float:
    return 1.0 if predicate(name) else 0.0
