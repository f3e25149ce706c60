"""Scenario `scaleout`: N fresh nodes pull one multi-layer image at once (issue 13).

Per repetition and N: the floor (nginx from disk), then each target cold, warm (mirror
warmed through its warm API, nginx by one pull) and cold again against an origin whose
manifest GETs are limited like Docker Hub's; the order rotates every repetition. Every
round starts its target on an empty cache; link counters give the origin bytes.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from contextlib import ExitStack
from typing import Any

from .burst import pick, run_burst
from .chart import CHART, QUICK_CHART, draw
from .ctrnode import CtrNodes
from .node import NodePlan, pull
from .procs import NoiseMeter, cpu_seconds, harness_cpu
from .report import Column, ScenarioResult, Table, mib
from .scale_model import Measured, model_lines
from .scale_setup import (
    DISTRIBUTION,
    LIMITED,
    MIRROR1,
    NGINX_CACHE,
    NO_CACHE,
    WARMABLE,
    Setup,
    set_up,
)
from .scale_stats import (
    FLOOR_NAME,
    added_above,
    limit_for,
    node_figures,
    reasons_text,
    summary_row,
    verdicts,
)
from .scale_targets import ScaleTarget
from .world import World, group_by, guarded, settle

PHASES = ("cold", "warm", "limited")


def plan_rounds(setup: Setup, phases: tuple[str, ...], rep: int) -> list[tuple[str, ScaleTarget]]:
    """(phase, target) pairs of one repetition at one N, rotated by `rep`."""
    rounds: list[tuple[str, ScaleTarget]] = [("floor", setup.floor)]
    for phase in PHASES:
        if phase not in phases:
            continue
        for t in setup.targets:
            if (phase == "warm" and t.name not in WARMABLE) or (
                phase == "limited" and t.name not in LIMITED
            ):
                continue
            rounds.append((phase, t))
    k = rep % len(rounds)
    return rounds[k:] + rounds[:k]


async def _round(
    world: World, setup: Setup, ctr: CtrNodes, target: ScaleTarget, phase: str, n: int, rep: int
) -> dict[str, Any]:
    s = world.scale
    assert s is not None
    image = setup.image
    await asyncio.to_thread(target.fresh)
    ctr_at = pick(n, s.ctr_nodes) if phase in ("cold", "warm", "floor") else []
    step = max(1, round(1 / s.verify_fraction)) if s.verify_fraction > 0 else n + 1
    ns = setup.registry if target.mirror_like else None
    try:
        warm: dict[str, Any] = {}
        if phase == "warm":

            async def pull_once(base: str) -> Any:
                plan = NodePlan(base, image.name, image.tag, ns, 0.0, True, timeout=s.node_timeout)
                return await pull(plan)

            warm = await target.warm(setup.ref, pull_once)
            if not warm.get("ok"):
                raise RuntimeError(f"warm-up failed: {warm}")
        world.link.limit(limit_for(n, s.limit_per_node) if phase == "limited" else 0)
        world.link.reset()
        urls = target.urls()
        plans = [
            NodePlan(
                urls[i % len(urls)],
                image.name,
                image.tag,
                ns,
                s.nic_mbps * 1e6,
                verify=i % step == 0,
                timeout=s.node_timeout,
            )
            for i in range(n)
        ]
        if ctr_at:
            await asyncio.to_thread(ctr.start, urls, target.mirror_like)
        pids = target.pids()
        noise = NoiseMeter(world.pids() + pids)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        link_cpu0, origin_cpu0 = cpu_seconds(world.link.pid), cpu_seconds(world.registry_pid)
        client0 = harness_cpu()
        ref = f"{setup.registry}/{setup.ref}"
        burst = await run_burst(plans, ctr if ctr_at else None, ctr_at, ref, s.window_s)
        server_cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        client_cpu = harness_cpu() - client0
        await settle()
        link = world.link.stats()
        load = noise.stop()
        peak = target.peak_rss()
        link_cpu = cpu_seconds(world.link.pid) - link_cpu0
        origin_cpu = cpu_seconds(world.registry_pid) - origin_cpu0
    finally:
        world.link.limit(0)
        await asyncio.to_thread(ctr.stop)
        await asyncio.to_thread(target.stop)
    sims = [r for r in burst.nodes if r.kind == "sim"]
    reals = [r for r in burst.nodes if r.kind == "ctr"]
    for r in reals:  # ctr does not say how much it read: a whole image when it succeeded
        r.bytes = image.total_bytes if r.ok else 0
    served = sum(r.bytes for r in burst.nodes)
    figures = node_figures(sims)
    return {
        "phase": phase,
        "target": target.name,
        "n": n,
        "rep": rep,
        **figures,
        "wall_s": burst.wall,
        "origin_bytes": link["bytes_down"],
        "origin_copies": link["bytes_down"] / image.total_bytes,
        "origin_requests": link["requests"],
        "origin_refused": link.get("refused", 0),
        "served_bytes": served,
        "server_cpu_s": server_cpu if pids else math.nan,
        "cpu_s_per_gb": server_cpu / (served / 1e9) if pids and served else math.nan,
        "client_cpu_s": client_cpu,
        "link_cpu_s": link_cpu,
        "origin_cpu_s": origin_cpu,
        "peak_rss": peak,
        "ctr_seconds": [r.seconds for r in reals if r.ok],
        "ctr_p50_s": node_figures(reals)["p50_s"] if reals else math.nan,
        "ctr_failed": sum(not r.ok for r in reals),
        "ctr_problems": [r.detail for r in reals if not r.ok][:3],
        "problems": sorted({f"{r.reason}: {r.detail}" for r in burst.nodes if not r.ok})[:5],
        "nodes_detail": [
            [r.kind, round(r.start, 3), round(r.seconds, 3), r.ok, r.reason] for r in burst.nodes
        ],
        "warm": warm,
        **load,
    }


COLUMNS = [
    Column("phase", "phase", left=True),
    Column("n", "N", "{}"),
    Column("target", "target", left=True),
    Column("p50_s", "p50 s", "{:.2f}"),
    Column("p95_s", "p95 s", "{:.2f}"),
    Column("max_s", "max s", "{:.2f}"),
    Column("added_s", "+floor s", "{:+.2f}"),
    Column("vs_floor", "p95/floor", "{:.2f}x"),
    Column("failed_text", "failed (why)", left=True),
    Column("origin_copies", "origin x", "{:.2f}"),
    Column("server_cpu_s", "cpu s", "{:.1f}"),
    Column("cpu_s_per_gb", "cpu s/GB", "{:.2f}"),
    Column("peak_rss_mb", "RSS MB", "{:.0f}"),
    Column("ctr_text", "ctr nodes s", left=True),
]


def _table(world: World, setup: Setup, rows: list[dict[str, Any]]) -> Table:
    s = world.scale
    assert s is not None
    table = Table("scaleout: N fresh nodes pull one image (medians over repetitions)", COLUMNS)
    floors = {r["n"]: r for r in rows if r["phase"] == "floor"}
    order = {"floor": 0, "cold": 1, "warm": 2, "limited": 3}
    for row in sorted(rows, key=lambda r: (r["n"], order[r["phase"]])):
        floor = floors.get(row["n"])
        if floor and row["phase"] != "floor":
            row["added_s"] = added_above(row["p95_s"], floor["p95_s"])
            row["vs_floor"] = row["p95_s"] / floor["p95_s"] if floor["p95_s"] else math.nan
        row["failed_text"] = f"{row['failed']} ({reasons_text(row['reasons'])})"
        ctr_s = ", ".join(f"{t:.1f}" for t in row["ctr_s"][:6])
        row["ctr_text"] = ctr_s + (f" ({row['ctr_failed']} failed)" if row["ctr_failed"] else "")
        table.add(**row)
    img = setup.image
    sizes = ", ".join(f"{mib(b.size):.0f}" for b in img.image.layers)
    every = max(1, round(1 / s.verify_fraction)) if s.verify_fraction else 0
    table.notes.append(
        f"image {mib(img.total_bytes):.0f} MiB: index, manifest, config and "
        f"{len(img.image.layers)} tar layers of random bytes ({sizes} MiB); nodes: "
        f"{s.nic_mbps:g} MB/s NIC each, 3 layers at a time, arriving over {s.window_s:g} s, "
        f"sha256 of every byte on every {every}th node"
    )
    table.notes.append(
        f"link to the origin: {world.settings.latency_ms:g} ms one way, "
        f"{world.settings.rate_mbps:g} MB/s per connection; origin x: link bytes / image "
        f"bytes; limited: {s.limit_per_node:g} manifest GETs per node of the burst "
        "(429 past it, HEAD free)"
    )
    table.notes.append(
        "p50/p95/max over simulated nodes that finished; +floor s: p95 minus the floor's p95 "
        "(same run); ctr nodes s: pull times of the real containerd nodes (ctr images pull, "
        "unpack included) in the same bursts; cpu s: the target's processes during the burst"
    )
    return table


async def scaleout(world: World) -> ScenarioResult:
    """N fresh nodes pull one image: the mirror against its peers, the origin and the floor."""
    result = ScenarioResult("scaleout")
    s = world.scale
    assert s is not None
    records: list[dict[str, Any]] = []
    with ExitStack() as stack:
        t0 = time.monotonic()
        setup = await set_up(world, stack, s.targets)
        print(
            f"  scaleout: pushed {mib(setup.image.total_bytes):.0f} MiB image and started the "
            f"targets in {time.monotonic() - t0:.1f}s: " + ", ".join(t.name for t in setup.targets),
            file=sys.stderr,
            flush=True,
        )
        for note in setup.notes:
            print(f"  scaleout: {note}", file=sys.stderr, flush=True)
        ctr = CtrNodes(world.workdir / "scaleout" / "ctr", s.ctr_nodes, s.nic_mbps, setup.registry)
        stack.callback(ctr.close)
        rounds = [
            (rep, n, phase, target)
            for rep in range(world.settings.reps)
            for n in s.nodes
            for phase, target in plan_rounds(setup, s.phases, rep)
        ]
        for i, (rep, n, phase, target) in enumerate(rounds, 1):
            if world.over_budget():
                result.errors.append(f"time budget exceeded: skipped {len(rounds) - i + 1} rounds")
                break
            what = f"[{i}/{len(rounds)}] {phase} {target.name} N={n} rep={rep}"
            print(f"  {what} ...", file=sys.stderr, flush=True)
            rec = await guarded(
                result, world, what, _round(world, setup, ctr, target, phase, n, rep)
            )
            if rec is None:
                result.errors[-1] += "\n" + target.log_tail()[-1500:]
                continue
            records.append(rec)
            print(
                f"    p95 {rec['p95_s']:.2f}s, failed {rec['failed']} "
                f"({reasons_text(rec['reasons'])}), origin x{rec['origin_copies']:.2f}, "
                f"ctr {', '.join(f'{t:.1f}' for t in rec['ctr_seconds'])}",
                file=sys.stderr,
                flush=True,
            )
        rows = [summary_row(g) for g in group_by(records, "phase", "target", "n").values()]
        table = _table(world, setup, rows)
        for note in setup.notes:
            table.notes.append(note)
        checks = verdicts(rows, MIRROR1, (NGINX_CACHE, DISTRIBUTION), (50, 100))
        world.targets.extend(checks)
        lines = _model(rows)
        table.notes.extend(f"model: {line}" for line in lines)
        # Only a full run replaces the committed chart; --quick or a subset (some targets,
        # phases or N) draws beside the JSON.
        path = draw(rows, _chart_title(world, setup), CHART if _full(world) else QUICK_CHART)
        table.notes.append(f"chart: {path}" if path else "chart: matplotlib not installed")
        result.tables.append(table)
        result.reps.append({"model": lines, "targets": checks, "rows": rows})
    return result


def _full(world: World) -> bool:
    s = world.scale
    assert s is not None
    every_phase = set(s.phases) >= {"cold", "warm", "limited"}
    return not world.settings.quick and not s.targets and every_phase and len(s.nodes) >= 3


def _chart_title(world: World, setup: Setup) -> str:
    s = world.scale
    assert s is not None
    return (
        f"N fresh nodes pull a {mib(setup.image.total_bytes):.0f} MiB image "
        f"({s.nic_mbps:g} MB/s per node, 2-core box; medians of {world.settings.reps})"
    )


def _model(rows: list[dict[str, Any]]) -> list[str]:
    """The seed-cluster model from this run's rows (largest N measured)."""
    if not rows:
        return []
    top = max(r["n"] for r in rows)
    by = {(r["phase"], r["target"], r["n"]): r for r in rows}
    cold, warm = by.get(("cold", MIRROR1, top)), by.get(("warm", MIRROR1, top))
    floor, direct = by.get(("floor", FLOOR_NAME, top)), by.get(("cold", NO_CACHE, top))
    if not (cold and floor):
        return ["no mirror and floor rows: model not computed"]
    cpu = (warm or cold)["cpu_s_per_gb"]
    measured = Measured(
        mirror_copies=cold["origin_copies"],
        direct_copies_per_node=direct["origin_copies"] / top if direct else 1.0,
        cpu_s_per_gb=cpu,
        p95_over_floor=cold["p95_s"] / floor["p95_s"],
    )
    return model_lines(measured)
