"""Warm scenario c.: the cached blob to 1 and 50 keep-alive clients, mirror vs nginx sendfile."""

from __future__ import annotations

import math
from typing import Any

from . import clients
from .report import Column, ScenarioResult, Table, mib, ratio, spread_pct
from .world import (
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


async def warm_serving(world: World) -> ScenarioResult:
    """c. Cached blob to 1 and 50 keep-alive clients: mirror vs nginx static with sendfile."""
    result = ScenarioResult("warm")
    s = world.settings
    blob = world.big.layers[0]
    path = f"/v2/{world.big.name}/blobs/{blob.digest}"
    mirror_ok = await fresh_warm_mirror(world, result)
    if mirror_ok:
        assert world.mirror is not None
        # Fill the cache once (verified), then check that the next GET is a pure hit.
        fill = await clients.fan_out(world.mirror.url + path, 1, blob.digest, s.client_timeout)
        world.link.reset()
        again = await clients.fan_out(world.mirror.url + path, 1, blob.digest, s.client_timeout)
        hit_requests = world.link.stats()["requests_total"]
        ok = fill.downloads[0].digest_ok and again.downloads[0].digest_ok
        result.reps.append(
            {"fill_s": fill.wall, "hit_s": again.wall, "hit_link_requests": hit_requests, "ok": ok}
        )
        if not ok:
            result.errors.append(
                f"mirror warm-up failed: {fill.downloads[0]} / {again.downloads[0]}"
            )
            mirror_ok = False
    script = clients.wrk_script(world.workdir, "GET")
    records = []
    for n in s.warm_clients:
        for rep in range(s.reps):
            if world.over_budget():
                result.errors.append(f"time budget exceeded: skipped warm n={n} from rep {rep}")
                break
            for system in world.systems(rep, NGINX_STATIC):
                if system == MIRROR and not mirror_ok:
                    continue

                def run(url: str, n: int = n) -> dict[str, Any]:
                    return clients.run_wrk(
                        url,
                        connections=n,
                        threads=s.wrk_threads,
                        seconds=s.warm_seconds,
                        script=script,
                        timeout=max(30.0, s.client_timeout),
                    )

                rec = await guarded(
                    result,
                    world,
                    f"{system} warm n={n} rep={rep}",
                    load_round(world, system, rep, n, "blob GET", run, path),
                )
                if rec:
                    rec["gb_per_s"] = rec["bytes_per_s"] / 1e9
                    rec["cpu_s_per_gb"] = ratio(
                        rec["server_cpu_s"], rec["bytes_per_s"] * s.warm_seconds / 1e9
                    )
                    records.append(rec)
    peak = world.mirror.peak_rss() if mirror_ok and world.mirror else math.nan
    table = Table(
        "c. warm serving: cached blob, aggregate throughput",
        [
            Column("clients", "clients", "{}"),
            Column("system", "system", left=True),
            Column("gb_per_s", "GB/s", "{:.2f}"),
            Column("spread", "+-%", "{:.0f}"),
            Column("rps", "req/s", "{:.1f}"),
            Column("cpu_s_per_gb", "server cpu s/GB", "{:.2f}"),
            Column("rss_mb", "RSS max MB", "{:.0f}"),
            Column("errors", "errors", "{:.0f}"),
            Column("link_requests", "link reqs", "{:.0f}"),
        ],
    )
    table.notes.append(
        f"blob {mib(blob.size):.0f} MiB, wrk -d{s.warm_seconds:g}s -t<=min(N,{s.wrk_threads}); "
        f"medians of {s.reps} repetitions; nginx {s.nginx_workers} worker(s)"
    )
    groups = group_by(records, "clients", "system")
    for n in s.warm_clients:
        rows = {}
        for system in (MIRROR, NGINX_STATIC):
            group = groups.get((n, system))
            if not group:
                continue
            rows[system] = {
                "clients": n,
                "system": system,
                "gb_per_s": med(group, "gb_per_s"),
                "spread": spread_pct(r["gb_per_s"] for r in group),
                "rps": med(group, "rps"),
                "cpu_s_per_gb": med(group, "cpu_s_per_gb"),
                "rss_mb": med(group, "rss_max") / 1e6 if system == MIRROR else math.nan,
                "errors": max(r["non_2xx"] + r["socket_errors"] for r in group),
                "link_requests": sum(r["link_requests"] for r in group),
            }
            table.add(**rows[system])
        if len(rows) == 2:
            r = ratio(rows[MIRROR]["gb_per_s"], rows[NGINX_STATIC]["gb_per_s"])
            table.add(
                clients=n,
                system="ratio mirror/nginx",
                gb_per_s=r,
                cpu_s_per_gb=ratio(
                    rows[MIRROR]["cpu_s_per_gb"], rows[NGINX_STATIC]["cpu_s_per_gb"]
                ),
            )
            world.target(
                f"warm serving {n} client(s): throughput vs nginx sendfile",
                ">= 0.9x",
                r,
                r >= 0.9,
                "{:.3f}x",
            )
    _live_vs_warm(world, table, groups)
    table.notes.append(f"mirror peak RSS over the whole scenario (VmHWM): {peak / 1e6:.0f} MB")
    table.notes.append(noise_note(records))
    if not math.isnan(peak):
        world.target(
            f"memory: mirror peak RSS, warm {max(s.warm_clients)} clients",
            "< 200 MB",
            peak / 1e6,
            peak < 200e6,
            "{:.0f} MB",
        )
    result.tables.append(table)
    return result


def _live_vs_warm(world: World, table: Table, warm: dict[Any, list[dict[str, Any]]]) -> None:
    """The live path (clients following a fill) against cached serving, CPU per GB served,
    at the largest client count of a.: cached serving measured right after each cold round
    with the same clients (aiohttp, hashing what they get), so the two figures differ only in
    whether a fill was followed. wrk's figure (this table) is shown beside it."""
    cold = group_by([r for r in world.cold_records if r["system"] == MIRROR], "clients")
    if not cold:
        return
    n = max(k[0] for k in cold)
    live = med(cold[(n,)], "cpu_s_per_gb")
    cached = med(cold[(n,)], "warm_cpu_s_per_gb")
    r = ratio(live, cached)
    wrk = warm.get((max(k[0] for k in warm), MIRROR)) if warm else None
    table.notes.append(
        f"live path (a., {n} cold clients) {live:.2f} CPU s/GB served, fill included, vs "
        f"{cached:.2f} for the same clients on the cached blob: {r:.2f}x"
        + (f" (wrk on the cached blob: {med(wrk, 'cpu_s_per_gb'):.2f})" if wrk else "")
    )
    world.target(f"live path CPU per GB vs warm, {n} clients", "<= 1.5x", r, r <= 1.5, "{:.2f}x")


# --------------------------------------------------------------------------- manifests
