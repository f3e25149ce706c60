"""Manifest scenario d.: HEAD by tag and GET by digest on cached manifests, under load."""

from __future__ import annotations

import math
from typing import Any

from . import clients
from .report import Column, ScenarioResult, Table, ratio, spread_pct
from .world import (
    FLOOR,
    MIRROR,
    NGINX_STATIC,
    World,
    fresh_warm_mirror,
    group_by,
    guarded,
    load_round,
    med,
    noise_note,
)


async def _check_manifest_headers(world: World, result: ScenarioResult) -> list[str]:
    """Warm the mirror's manifest cache and check what containerd depends on (DESIGN §2)."""
    assert world.mirror is not None
    img = world.small
    accept = {"Accept": clients.MANIFEST_ACCEPT}
    problems = []
    base = f"{world.mirror.url}/v2/{img.name}/manifests/"
    for method, ref in (
        ("HEAD", img.tag),
        ("GET", img.tag),
        ("GET", img.digest),
        ("HEAD", img.digest),
    ):
        status, headers, body = await clients.fetch(base + ref, method, accept)
        where = f"{method} {ref[:19]}"
        if status != 200:
            problems.append(f"{where}: status {status}")
            continue
        if headers.get("Content-Type") != img.media_type:
            problems.append(f"{where}: Content-Type {headers.get('Content-Type')!r}")
        if headers.get("Docker-Content-Digest") != img.digest:
            problems.append(
                f"{where}: Docker-Content-Digest {headers.get('Docker-Content-Digest')!r}"
            )
        if headers.get("Content-Length") != str(len(img.manifest)):
            problems.append(f"{where}: Content-Length {headers.get('Content-Length')!r}")
        if method == "GET" and body != img.manifest:
            problems.append(f"{where}: body differs from the pushed bytes")
    return problems


async def manifests(world: World) -> ScenarioResult:
    """d. HEAD by tag and GET by digest on cached manifests: mirror vs nginx static files."""
    result = ScenarioResult("manifests")
    s = world.settings
    img = world.small
    mirror_ok = await fresh_warm_mirror(world, result)
    if mirror_ok:
        problems = await _check_manifest_headers(world, result)
        result.reps.append({"header_checks": problems or "ok"})
        if problems:
            result.errors.append("mirror manifest responses: " + "; ".join(problems))
    get_script = clients.wrk_script(world.workdir, "GET")
    accept = {"Accept": clients.MANIFEST_ACCEPT}
    kinds = {
        # wrk cannot complete HEAD requests (it waits for the body), so HEAD uses ab -k.
        "HEAD tag (ab)": (f"/v2/{img.name}/manifests/{img.tag}", "ab"),
        "GET digest (wrk)": (f"/v2/{img.name}/manifests/{img.digest}", "wrk"),
    }
    records = []
    for kind, (path, tool) in kinds.items():
        for n in s.manifest_clients:
            for rep in range(s.reps):
                if world.over_budget():
                    result.errors.append(f"time budget exceeded: skipped {kind} n={n} rep {rep}")
                    break
                # The framework floor only at the target's concurrency, to keep runs short.
                peers_here = (
                    (NGINX_STATIC, FLOOR) if n == max(s.manifest_clients) else (NGINX_STATIC,)
                )
                for system in world.systems(rep, *peers_here):
                    if system == MIRROR and not mirror_ok:
                        continue

                    def run(url: str, n: int = n, tool: str = tool) -> dict[str, Any]:
                        if tool == "ab":
                            return clients.run_ab(
                                url,
                                connections=n,
                                seconds=s.manifest_seconds,
                                workdir=world.workdir,
                                headers=accept,
                            )
                        return clients.run_wrk(
                            url,
                            connections=n,
                            threads=s.wrk_threads,
                            seconds=s.manifest_seconds,
                            script=get_script,
                            headers=accept,
                        )

                    rec = await guarded(
                        result,
                        world,
                        f"{system} {kind} n={n} rep={rep}",
                        load_round(world, system, rep, n, kind, run, path),
                    )
                    if rec:
                        records.append(rec)
    table = Table(
        "d. manifests: cached, keep-alive clients",
        [
            Column("kind", "request", left=True),
            Column("clients", "clients", "{}"),
            Column("system", "system", left=True),
            Column("rps", "req/s", "{:.0f}"),
            Column("spread", "+-%", "{:.0f}"),
            Column("p50_ms", "p50 ms", "{:.2f}"),
            Column("p99_ms", "p99 ms", "{:.2f}"),
            Column("errors", "errors", "{:.0f}"),
            Column("link_requests", "link reqs", "{:.0f}"),
            Column("cpu_s", "server cpu s", "{:.2f}"),
        ],
    )
    table.notes.append(
        f"{s.manifest_seconds:g} s per run, medians of {s.reps} repetitions; link reqs: upstream "
        "requests during all runs (the tag is fresh: expect 0); errors: non-2xx + socket errors "
        "(max over repetitions); aiohttp floor: a bare aiohttp+uvloop app answering from "
        "memory, the most one Python process of this stack can do"
    )
    table.notes.append(noise_note(records))
    groups = group_by(records, "kind", "clients", "system")
    for kind in kinds:
        for n in s.manifest_clients:
            rows = {}
            for system in (MIRROR, NGINX_STATIC, FLOOR):
                group = groups.get((kind, n, system))
                if not group:
                    continue
                rows[system] = {
                    "kind": kind,
                    "clients": n,
                    "system": system,
                    "rps": med(group, "rps"),
                    "spread": spread_pct(r["rps"] for r in group),
                    "p50_ms": med(group, "p50_ms"),
                    "p99_ms": med(group, "p99_ms"),
                    "errors": max(r["non_2xx"] + r["socket_errors"] for r in group),
                    "link_requests": sum(r["link_requests"] for r in group),
                    "cpu_s": med(group, "server_cpu_s"),
                }
                table.add(**rows[system])
            for peer, label in (
                (NGINX_STATIC, "ratio mirror/nginx"),
                (FLOOR, "ratio mirror/floor"),
            ):
                if MIRROR in rows and peer in rows:
                    m, g = rows[MIRROR], rows[peer]
                    table.add(
                        kind=kind,
                        clients=n,
                        system=label,
                        rps=None,
                        p50_ms=ratio(m["p50_ms"], g["p50_ms"]),
                        p99_ms=ratio(m["p99_ms"], g["p99_ms"]),
                    )
                    table.rows[-1]["rps_ratio"] = ratio(m["rps"], g["rps"])
            if MIRROR in rows and NGINX_STATIC in rows:
                m, g = rows[MIRROR], rows[NGINX_STATIC]
                if n == max(s.manifest_clients):
                    r = ratio(m["rps"], g["rps"])
                    world.target(
                        f"{kind} {n} clients: req/s vs nginx static",
                        ">= 0.5x",
                        r,
                        r >= 0.5,
                        "{:.3f}x",
                    )
                    world.target(
                        f"{kind} {n} clients: p99",
                        "< 10 ms",
                        m["p99_ms"],
                        m["p99_ms"] < 10,
                        "{:.2f} ms",
                    )
            if MIRROR in rows:
                links = rows[MIRROR]["link_requests"]
                world.target(
                    f"{kind} {n} clients: upstream requests while fresh",
                    "0",
                    float(links),
                    links == 0,
                    "{:.0f}",
                )
    # The ratio rows carry req/s as a ratio: show it in the req/s column with an x.
    for row in table.rows:
        if "rps_ratio" in row:
            row["rps"] = "-" if math.isnan(row["rps_ratio"]) else f"{row['rps_ratio']:.3f}x"
    result.tables.append(table)
    return result
