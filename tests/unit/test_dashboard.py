"""The Grafana dashboard is valid JSON whose PromQL names only series the mirror exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from mirror.metrics import REQUEST_KINDS, REQUEST_RESULTS, SERVED_SOURCES, Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"
# Labels Prometheus adds at scrape time, and the bucket bound of a histogram.
SCRAPE_LABELS = {"instance", "job"}
CLOSED_VALUES = {"kind": REQUEST_KINDS, "result": REQUEST_RESULTS, "source": SERVED_SOURCES}

_METRIC = re.compile(r"\bmirror_[a-z0-9_]+\b")
_SELECTOR = re.compile(r"\b(mirror_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_RANGE_FN = re.compile(r"\b(rate|increase|irate)\(\s*(mirror_[a-z0-9_]+)")
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_BUILTINS = {"__rate_interval", "__range", "__interval"}


def exported_series() -> dict[str, tuple[str, set[str]]]:
    """Every series name the mirror can expose -> (type, label names)."""
    metrics = Metrics()
    series: dict[str, tuple[str, set[str]]] = {}
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            (family,) = collector.describe()
            # prometheus_client has no public accessor for a parent's label names.
            _add(series, family.type, family.name, set(collector._labelnames))
    # The request families come from a collector of the mirror's own, whose closed label sets
    # all exist from the start: its samples show every label.
    for family in metrics.requests.collect():
        labels = {name for sample in family.samples for name in sample.labels} - {"le"}
        _add(series, family.type, family.name, labels)
    return series


def _add(series: dict[str, tuple[str, set[str]]], kind: str, name: str, labels: set[str]) -> None:
    if kind == "counter":
        series[name + "_total"] = ("counter", labels)
    elif kind == "histogram":
        series[name + "_bucket"] = ("histogram", labels | {"le"})
        series[name + "_sum"] = ("counter", labels)
        series[name + "_count"] = ("counter", labels)
    else:
        series[name] = (kind, labels)


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(all_panels(panel.get("panels", [])))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [
        target["expr"]
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]

    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID
        assert panel["targets"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID


def test_dashboard_covers_the_promised_panels(dashboard: dict[str, Any]) -> None:
    used = {m for expr in expressions(dashboard) for m in _METRIC.findall(expr)}
    assert {
        "mirror_requests_total",
        "mirror_request_duration_seconds_bucket",
        "mirror_served_bytes_total",
        "mirror_upstream_bytes_total",
        "mirror_upstream_requests_total",
        "mirror_upstream_throttled_total",
        "mirror_upstream_ratelimit_remaining",
        "mirror_stale_served_total",
        "mirror_upstream_breaker_open",
        "mirror_cache_bytes",
        "mirror_cache_capacity_bytes",
        "mirror_cache_high_watermark_bytes",
        "mirror_cache_low_watermark_bytes",
        "mirror_cache_entries",
        "mirror_cache_evictions_total",
        "mirror_cache_evicted_bytes_total",
        "mirror_downloads_in_flight",
    } <= used
    exprs = " ".join(expressions(dashboard))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_every_referenced_series_is_exported(dashboard: dict[str, Any]) -> None:
    series = exported_series()
    for expr in expressions(dashboard):
        for name in _METRIC.findall(expr):
            assert name in series, f"{name} in {expr!r} is not exported"


def test_label_names_and_values_exist(dashboard: dict[str, Any]) -> None:
    series = exported_series()
    for expr in expressions(dashboard):
        in_expr: set[str] = set(SCRAPE_LABELS)
        for name, matchers in _SELECTOR.findall(expr):
            labels = series[name][1] | SCRAPE_LABELS
            in_expr |= labels
            for label, _, value in _MATCHER.findall(matchers):
                assert label in labels, f"{name} has no label {label!r}: {expr!r}"
                if label in CLOSED_VALUES and not value.startswith("$"):
                    assert set(value.split("|")) <= set(CLOSED_VALUES[label]), expr
        for name in _METRIC.findall(expr):
            in_expr |= series[name][1]
        for group in _GROUPING.findall(expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in in_expr, f"grouping by unknown label {label!r}: {expr!r}"
        if expr.startswith("label_values("):
            label = expr.rstrip(")").rsplit(",", 1)[1].strip()
            assert label in in_expr, expr


def test_rate_and_increase_only_see_counters(dashboard: dict[str, Any]) -> None:
    series = exported_series()
    for expr in expressions(dashboard):
        for fn, name in _RANGE_FN.findall(expr):
            assert series[name][0] in ("counter", "histogram"), f"{fn}() of a gauge: {expr!r}"


def test_every_variable_is_defined(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | _BUILTINS
    text = json.dumps(dashboard["panels"])
    for name in _VARIABLE.findall(text):
        assert name in defined, f"${name} is not a dashboard variable"


def _panels_titled(dashboard: dict[str, Any], title: str) -> list[dict[str, Any]]:
    found = [p for p in all_panels(dashboard["panels"]) if p.get("title") == title]
    assert found, f"no panel {title!r}"
    return found


# Results answered from the cache: everything but a miss (fetched), a 404 and an error.
FROM_CACHE = set(REQUEST_RESULTS) - {"miss", "not_found", "error"}


@pytest.mark.parametrize("title", ["Hit ratio", "Hit ratio by kind"])
def test_hit_ratios_count_every_answer_from_the_cache(
    dashboard: dict[str, Any], title: str
) -> None:
    assert "revalidated" in FROM_CACHE  # a tag the origin confirmed, served from the cache
    for panel in _panels_titled(dashboard, title):
        (target,) = panel["targets"]
        numerator, _, _ = target["expr"].partition(" / ")
        results = dict((k, v) for k, _, v in _MATCHER.findall(numerator))["result"]
        assert set(results.split("|")) == FROM_CACHE, target["expr"]


def _denominators(expr: str) -> list[str]:
    """The operand right of each `/`: a parenthesised group or a function call."""
    found = []
    for match in re.finditer(r" / ", expr):
        rest = expr[match.end() :]
        depth = 0
        for n, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if char == ")" and depth == 0:
                found.append(rest[: n + 1])
                break
        else:
            found.append(rest)
    return found


def test_every_division_guards_a_zero_denominator(dashboard: dict[str, Any]) -> None:
    """Nothing served (only warming) or no cap must show "no data", never -Inf or NaN."""
    divisions = 0
    for expr in expressions(dashboard):
        for denominator in _denominators(expr):
            divisions += 1
            guarded = denominator.startswith("clamp_min(") or (
                denominator.startswith("(") and denominator.endswith(" > 0)")
            )
            assert guarded, f"unguarded denominator {denominator!r} in {expr!r}"
    assert divisions >= 4


def test_egress_saved_is_one_minus_upstream_over_served(dashboard: dict[str, Any]) -> None:
    ((target,),) = [p["targets"] for p in _panels_titled(dashboard, "Egress saved")]
    upstream, _, served = target["expr"].partition(" / ")
    assert upstream.startswith("1 - sum(increase(mirror_upstream_bytes_total{")
    assert "mirror_served_bytes_total" in served


def test_cache_fill_is_a_fraction_of_the_cap(dashboard: dict[str, Any]) -> None:
    panels = _panels_titled(dashboard, "Cache fill")
    assert {p["type"] for p in panels} == {"stat", "timeseries"}
    for panel in panels:
        assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
        fill = panel["targets"][0]["expr"]
        assert re.match(r".*mirror_cache_bytes\{.*\} ?\)? / \(.*mirror_cache_capacity_bytes", fill)
    (over_time,) = [p for p in panels if p["type"] == "timeseries"]
    used = " ".join(t["expr"] for t in over_time["targets"])
    assert "mirror_cache_high_watermark_bytes" in used
    assert "mirror_cache_low_watermark_bytes" in used
