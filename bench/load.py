"""Load scenario e.: 1,000 busy keep-alive clients, new connections arriving, slow-header clients.

The scale-out moment itself: hundreds of nodes connect while others stream. The busy clients
cycle through a cached tag HEAD, a digest GET and a cached 4 KiB blob GET, each sending the
next request as soon as its answer is in. Meanwhile new connections arrive at a steady rate,
each with one request, timed from connect() to the end of its answer; and slow clients send a
request head a byte at a time. The generator is a process of its own (bench/loadgen.py).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import clients
from .procs import BenchError, NoiseMeter, cpu_seconds, process_tree, rss_bytes
from .report import Column, ScenarioResult, Table, ratio, spread_pct
from .target import REPO_ROOT
from .world import MIRROR, NGINX_STATIC, World, fresh_warm_mirror, group_by, guarded, med

CLIENTS = 1000
NEW_RATE = 20.0  # new connections per second during the measured part
SLOW = 50  # slow-header clients
SLOW_GAP = 1.0  # seconds between two bytes of theirs


def _fds(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            total += len(list(Path(f"/proc/{p}/fd").iterdir()))
        except OSError:
            continue
    return total


async def _sample(pid: int, stop: asyncio.Event, peak: dict[str, int]) -> None:
    """Peak RSS and open descriptors of the server's process tree, every 100 ms."""
    for _ in range(100_000):
        peak["rss"] = max(peak["rss"], rss_bytes(pid))
        peak["fds"] = max(peak["fds"], _fds(pid))
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
            return
        except TimeoutError:
            continue


def _requests(world: World) -> list[str]:
    img = world.small
    accept = f"Accept: {clients.MANIFEST_ACCEPT}"
    base = f"/v2/{img.name}"
    return [
        f"tag HEAD|HEAD|{base}/manifests/{img.tag}|{accept}",
        f"digest GET|GET|{base}/manifests/{img.digest}|{accept}",
        f"blob GET|GET|{base}/blobs/{img.layers[0].digest}",
    ]


def _generate(world: World, base_url: str, seconds: float) -> dict[str, Any]:
    hostport = base_url.split("://", 1)[1]
    argv = [
        sys.executable, "-m", "bench.loadgen", "--target", hostport,
        "--clients", str(CLIENTS), "--seconds", str(seconds), "--new-rate", str(NEW_RATE),
        "--slow", str(SLOW), "--slow-gap", str(SLOW_GAP),
    ]  # fmt: skip
    for spec in _requests(world):
        argv += ["--request", spec]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 120, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError("the load generator did not finish") from exc
    if out.returncode != 0:
        raise BenchError(f"load generator failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def _round(world: World, system: str, rep: int, seconds: float) -> dict[str, Any]:
    if system == MIRROR:
        assert world.mirror is not None
        base, pid = world.mirror.url, world.mirror.pid
    else:
        base, pid = world.static.url, world.static.pid
    noise = NoiseMeter(world.pids())
    cpu0 = cpu_seconds(pid)
    stop, peak = asyncio.Event(), {"rss": 0, "fds": 0}
    sampler = asyncio.create_task(_sample(pid, stop, peak))
    try:
        out = await asyncio.to_thread(_generate, world, base, seconds)
    finally:
        stop.set()
        await sampler
    new = out["new_connections"]
    return {
        "system": system,
        "rep": rep,
        "rps": out["rps"],
        "p50_ms": out["latency"]["p50_ms"],
        "p99_ms": out["latency"]["p99_ms"],
        "new_p50_ms": new["first_response"]["p50_ms"],
        "new_p99_ms": new["first_response"]["p99_ms"],
        "new_max_ms": new["first_response"]["max_ms"],
        "new_connect_p99_ms": new["connect"]["p99_ms"],
        "new_n": new["first_response"]["n"],
        "errors": out["errors"],
        "slow_cut": out["slow"]["cut"],
        "slow_cut_after_s": out["slow"]["cut_after_median_s"],
        "rss_max": peak["rss"],
        "fds_max": peak["fds"],
        "server_cpu_s": cpu_seconds(pid) - cpu0,
        "generator": out,
        **noise.stop(),
    }


async def load(world: World) -> ScenarioResult:
    """e. 1,000 busy keep-alive clients plus new and slow ones: mirror vs nginx static."""
    result = ScenarioResult("load")
    s = world.settings
    seconds = 6.0 if s.quick else 20.0
    mirror_ok = await fresh_warm_mirror(world, result)
    if mirror_ok:
        assert world.mirror is not None
        for spec in _requests(world):  # fill the cache and check each answer once
            kind, method, path, *headers = spec.split("|")
            hdrs = dict(h.split(": ", 1) for h in headers)
            status, _, _ = await clients.fetch(world.mirror.url + path, method, hdrs)
            if status != 200:
                result.errors.append(f"mirror warm-up {kind}: status {status}")
    records = []
    for rep in range(s.reps):
        if world.over_budget():
            result.errors.append(f"time budget exceeded: skipped load rep {rep}")
            break
        for system in world.systems(rep, NGINX_STATIC):
            if system == MIRROR and not mirror_ok:
                continue
            rec = await guarded(
                result, world, f"{system} load rep={rep}", _round(world, system, rep, seconds)
            )
            if rec:
                records.append(rec)
    table = Table(
        f"e. load: {CLIENTS} busy keep-alive clients, {NEW_RATE:g} new connections/s, "
        f"{SLOW} slow-header clients",
        [
            Column("system", "system", left=True),
            Column("rps", "req/s", "{:.0f}"),
            Column("spread", "+-%", "{:.0f}"),
            Column("p50_ms", "p50 ms", "{:.1f}"),
            Column("p99_ms", "p99 ms", "{:.1f}"),
            Column("new_p50_ms", "new p50 ms", "{:.1f}"),
            Column("new_p99_ms", "new p99 ms", "{:.1f}"),
            Column("new_max_ms", "new max ms", "{:.1f}"),
            Column("errors", "errors", "{:.0f}"),
            Column("slow_cut", "slow cut", "{:.0f}"),
            Column("rss_mb", "peak RSS MB", "{:.0f}"),
            Column("fds_max", "peak fds", "{:.0f}"),
            Column("cpu_s", "server cpu s", "{:.1f}"),
        ],
    )
    table.notes.append(
        f"{seconds:g} s measured per run after a 2 s ramp, medians of {s.reps} repetitions; "
        "busy clients cycle tag HEAD, digest GET, 4 KiB blob GET; new: connect() to the end "
        "of a new connection's first answer; errors: non-200, lost connections, failed new "
        f"connections (max over repetitions); slow cut: of {SLOW} clients sending a head a "
        f"byte every {SLOW_GAP:g} s, those the server hung up on (nginx waits 60 s)"
    )
    groups = group_by(records, "system")
    rows: dict[str, dict[str, Any]] = {}
    for system in (MIRROR, NGINX_STATIC):
        group = groups.get((system,))
        if not group:
            continue
        rows[system] = {
            "system": system,
            "rps": med(group, "rps"),
            "spread": spread_pct(r["rps"] for r in group),
            "p50_ms": med(group, "p50_ms"),
            "p99_ms": med(group, "p99_ms"),
            "new_p50_ms": med(group, "new_p50_ms"),
            "new_p99_ms": med(group, "new_p99_ms"),
            "new_max_ms": max(r["new_max_ms"] for r in group),
            "errors": max(r["errors"] for r in group),
            "slow_cut": med(group, "slow_cut"),
            "rss_mb": max(r["rss_max"] for r in group) / 1e6,
            "fds_max": max(r["fds_max"] for r in group),
            "cpu_s": med(group, "server_cpu_s"),
        }
        table.add(**rows[system])
    if MIRROR in rows and NGINX_STATIC in rows:
        m, g = rows[MIRROR], rows[NGINX_STATIC]
        table.add(
            system="ratio mirror/nginx",
            rps=f"{ratio(m['rps'], g['rps']):.3f}x",
            p50_ms=ratio(m["p50_ms"], g["p50_ms"]),
            p99_ms=ratio(m["p99_ms"], g["p99_ms"]),
            new_p99_ms=ratio(m["new_p99_ms"], g["new_p99_ms"]),
        )
    if MIRROR in rows:
        m = rows[MIRROR]
        world.target(
            f"{CLIENTS} busy clients: new connection first answer p99",
            "< 1 s",
            m["new_p99_ms"] / 1000,
            m["new_p99_ms"] < 1000,
            "{:.3f} s",
        )
        world.target(
            f"{CLIENTS} busy clients: errors", "0", m["errors"], m["errors"] == 0, "{:.0f}"
        )
        world.target(
            f"peak RSS at {CLIENTS} connections",
            "< 300 MB",
            m["rss_mb"],
            m["rss_mb"] < 300,
            "{:.0f} MB",
        )
    result.tables.append(table)
    return result
