"""Scale-out figures from node results: percentiles, failures by reason, medians, verdicts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .node import NodeResult
from .report import median, percentile

FLOOR_NAME = "floor: nginx from disk"


def limit_for(n: int, per_node: float) -> int:
    """Manifest GETs the limited origin allows in one burst of n nodes: enough for a cache
    (a handful), too few for n nodes that each GET an index and a manifest."""
    return max(4, math.ceil(per_node * n))


def node_figures(nodes: Iterable[NodeResult]) -> dict[str, Any]:
    """Pull time p50/p95/max over the nodes that finished, and why the others failed.

    A failed node has no pull time: it would read as fast (a 429 comes back at once).
    """
    nodes = list(nodes)
    done = [r.seconds for r in nodes if r.ok]
    reasons = Counter(r.reason or "error" for r in nodes if not r.ok)
    return {
        "nodes": len(nodes),
        "ok": len(done),
        "failed": len(nodes) - len(done),
        "reasons": dict(sorted(reasons.items())),
        "p50_s": percentile(done, 50),
        "p95_s": percentile(done, 95),
        "max_s": max(done, default=math.nan),
    }


def reasons_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())) or "-"


def merge_reasons(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Failure reasons summed over repetitions (the failed column shows the worst one)."""
    total: Counter[str] = Counter()
    for r in records:
        total.update(r.get("reasons", {}))
    return dict(total)


def summary_row(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one (phase, target, N)."""
    first = records[0]
    keys = (
        "p50_s",
        "p95_s",
        "max_s",
        "wall_s",
        "origin_copies",
        "server_cpu_s",
        "cpu_s_per_gb",
        "ctr_p50_s",
    )
    row: dict[str, Any] = {k: median(r.get(k, math.nan) for r in records) for k in keys}
    row.update(
        phase=first["phase"],
        target=first["target"],
        n=first["n"],
        reps=len(records),
        failed=max(r["failed"] for r in records),
        reasons=merge_reasons(records),
        ctr_failed=max(r.get("ctr_failed", 0) for r in records),
        peak_rss_mb=median(r["peak_rss"] / 1e6 for r in records if r.get("peak_rss")),
        ctr_s=sorted(t for r in records for t in r.get("ctr_seconds", [])),
    )
    return row


def added_above(p95: float, floor_p95: float) -> float:
    """The time a cache adds above the floor: its p95 minus the floor's p95 (same run)."""
    return p95 - floor_p95


def verdicts(
    rows: list[dict[str, Any]], mirror: str, peers: tuple[str, ...], compare_at: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Issue 13's targets, each with what was measured and PASS / FAIL / n/a."""
    by = {(r["phase"], r["target"], r["n"]): r for r in rows}
    ns = sorted({r["n"] for r in rows})
    out: list[dict[str, Any]] = []

    def add(what: str, goal: str, value: float, ok: bool | None, fmt: str, why: str = "") -> None:
        shown = "-" if math.isnan(value) else fmt.format(value)
        verdict = "n/a" if ok is None or math.isnan(value) else ("PASS" if ok else "FAIL")
        out.append({"target": what, "goal": goal, "measured": shown + why, "verdict": verdict})

    for n in ns:
        m = by.get(("cold", mirror, n))
        if m:
            add(
                f"N={n} cold: origin bytes / image",
                "<= 1.05",
                m["origin_copies"],
                m["origin_copies"] <= 1.05,
                "{:.3f}",
            )
        for phase in ("cold", "warm", "limited"):
            row = by.get((phase, mirror, n))
            if row:
                add(
                    f"N={n} {phase}: failed mirror nodes",
                    "0",
                    float(row["failed"]),
                    row["failed"] == 0,
                    "{:.0f}",
                )
        origin = by.get(("limited", "no cache", n))
        if origin:
            add(
                f"N={n} limited: failed straight-to-origin nodes",
                "> 0",
                float(origin["failed"]),
                origin["failed"] > 0,
                "{:.0f}",
            )
        floor = by.get(("floor", FLOOR_NAME, n))
        for phase, goal in (("cold", 1.5), ("warm", 1.2)):
            row = by.get((phase, mirror, n))
            if row and floor:
                r = row["p95_s"] / floor["p95_s"] if floor["p95_s"] else math.nan
                add(f"N={n} {phase}: p95 vs floor p95", f"<= {goal}x", r, r <= goal, "{:.2f}x")
        if n in compare_at and m and floor:
            mine = added_above(m["p95_s"], floor["p95_s"])
            for peer in peers:
                p = by.get(("cold", peer, n))
                if not p:
                    continue
                theirs = added_above(p["p95_s"], floor["p95_s"])
                # A cache that adds nothing (at or below the floor: noise) counts as 0 s; a
                # peer that adds nothing leaves no penalty to compare against.
                r = max(mine, 0.0) / theirs if theirs > 0 else math.nan
                why = f" ({mine:+.1f} s vs {theirs:+.1f} s)"
                add(
                    f"N={n} cold: time added above floor vs {peer}",
                    "<= 0.5x",
                    r,
                    r <= 0.5,
                    "{:.2f}x",
                    why,
                )
    top = max(ns, default=0)
    rss = [r["peak_rss_mb"] for r in rows if r["target"] == mirror and r["n"] == top]
    rss = [v for v in rss if not math.isnan(v)]
    if rss:
        add(
            f"N={top}: mirror peak RSS (any phase)",
            "< 300 MB",
            max(rss),
            max(rss) < 300,
            "{:.0f} MB",
        )
    return out
