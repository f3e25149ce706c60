"""Cold scenarios: a. N clients on one uncached blob, b. one client across the capped link."""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

from . import clients, peers
from .procs import NoiseMeter, cpu_seconds, peak_rss_bytes
from .report import Column, ScenarioResult, Table, median, mib, percentile, ratio, spread_pct
from .world import MIRROR, NGINX_CACHE, World, group_by, guarded, med, noise_note, settle


async def _cold_round(world: World, system: str, n: int, rep: int) -> dict[str, Any]:
    """One repetition: fresh cache, `n` clients released together on the uncached blob."""
    blob = world.big.layers[0]
    if system == MIRROR:
        assert world.mirror is not None
        await asyncio.to_thread(world.mirror.fresh)
        base, pid = world.mirror.url, world.mirror.pid
    else:
        await asyncio.to_thread(peers.fresh_proxy_cache, world.proxy)
        base, pid = world.proxy.url, world.proxy.pid
    world.link.reset()
    noise = NoiseMeter(world.pids())
    cpu0, link_cpu0 = cpu_seconds(pid), cpu_seconds(world.link.pid)
    url = f"{base}/v2/{world.big.name}/blobs/{blob.digest}"
    fan = await clients.fan_out(url, n, blob.digest, world.settings.client_timeout)
    await settle()
    link = world.link.stats()
    load = noise.stop()
    server_cpu = cpu_seconds(pid) - cpu0
    ttfbs = [d.ttfb for d in fan.downloads]
    dones = [d.seconds for d in fan.downloads]
    problems = sorted(
        {
            d.error or f"status {d.status}, {d.size} bytes, digest ok={d.digest_ok}"
            for d in fan.downloads
            if not d.digest_ok
        }
    )
    # The same clients again, on the blob now cached: what serving it costs without a fill to
    # follow, measured with the clients the live figure was measured with.
    warm_cpu_per_gb = math.nan
    if system == MIRROR:
        warm0 = cpu_seconds(pid)
        again = await clients.fan_out(url, n, blob.digest, world.settings.client_timeout)
        got = sum(d.size for d in again.downloads if d.digest_ok)
        if got:
            warm_cpu_per_gb = (cpu_seconds(pid) - warm0) / (got / 1e9)
    return {
        "system": system,
        "clients": n,
        "rep": rep,
        "warm_cpu_s_per_gb": warm_cpu_per_gb,
        "wall_s": fan.wall,
        "ttfb_p50_s": percentile(ttfbs, 50),
        "ttfb_max_s": max((t for t in ttfbs if not math.isnan(t)), default=math.nan),
        "done_p50_s": percentile(dones, 50),
        "ok": sum(d.digest_ok for d in fan.downloads),
        "problems": problems[:5],
        "link_bytes": link["bytes_down"],
        "link_per_blob": link["bytes_down"] / blob.size,
        "link_connections": link["connections"],
        "link_requests": link["requests"],
        "link_gets": sum(v for k, v in link["requests"].items() if k.startswith("GET blob")),
        "server_cpu_s": server_cpu,
        # The live path's cost: every byte the clients got, fill and verification included.
        "cpu_s_per_gb": server_cpu / (n * blob.size / 1e9),
        "client_cpu_s": fan.client_cpu,
        "link_cpu_s": cpu_seconds(world.link.pid) - link_cpu0,
        "loadavg_1m": os.getloadavg()[0],
        **load,
        "peak_rss": peak_rss_bytes(pid) if system == MIRROR else math.nan,
    }


COLD_COLUMNS = [
    Column("clients", "clients", "{}"),
    Column("system", "system", left=True),
    Column("wall_s", "wall s"),
    Column("wall_spread", "+-%", "{:.0f}"),
    Column("ttfb_p50_s", "ttfb p50 s"),
    Column("ttfb_max_s", "ttfb max s"),
    Column("link_per_blob", "link/blob", "{:.3f}"),
    Column("link_gets", "link GETs", "{:.0f}"),
    Column("link_connections", "link conns", "{:.0f}"),
    Column("ok", "sha256 ok"),
    Column("server_cpu_s", "server cpu s", "{:.2f}"),
    Column("cpu_s_per_gb", "server cpu s/GB served", "{:.2f}"),
    Column("client_cpu_s", "client cpu s", "{:.2f}"),
    Column("peak_rss_mb", "peak RSS MB", "{:.0f}"),
]


def _cold_rows(table: Table, records: list[dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """Median row per system for `n` clients, then the mirror/nginx ratio row."""
    rows: dict[str, dict[str, Any]] = {}
    groups = group_by(records, "clients", "system")
    for system in (MIRROR, NGINX_CACHE):
        group = groups.get((n, system))
        if not group:
            continue
        row = {
            "clients": n,
            "system": system,
            **{
                k: med(group, k)
                for k in (
                    "wall_s",
                    "ttfb_p50_s",
                    "ttfb_max_s",
                    "link_per_blob",
                    "link_gets",
                    "link_connections",
                    "server_cpu_s",
                    "cpu_s_per_gb",
                    "client_cpu_s",
                )
            },
            "wall_spread": spread_pct(r["wall_s"] for r in group),
            "ok": f"{min(r['ok'] for r in group)}/{n}",
            "peak_rss_mb": med(group, "peak_rss") / 1e6,
            "reps": len(group),
        }
        rows[system] = row
        table.add(**row)
    if MIRROR in rows and NGINX_CACHE in rows:
        m, g = rows[MIRROR], rows[NGINX_CACHE]
        table.add(
            clients=n,
            system="ratio mirror/nginx",
            wall_s=ratio(m["wall_s"], g["wall_s"]),
            ttfb_p50_s=ratio(m["ttfb_p50_s"], g["ttfb_p50_s"]),
            ttfb_max_s=ratio(m["ttfb_max_s"], g["ttfb_max_s"]),
        )
    return rows


def _link_note(world: World) -> str:
    s = world.settings
    return (
        f"link: {s.latency_ms:g} ms one-way latency, {s.rate_mbps:g} MB/s per TCP connection; "
        f"blob {mib(world.big.layers[0].size):.0f} MiB; medians of {s.reps} repetitions"
    )


async def cold_fanout(world: World) -> ScenarioResult:
    """a. N concurrent clients on one uncached blob: mirror vs nginx proxy_cache + cache_lock."""
    result = ScenarioResult("fanout")
    s = world.settings
    records: list[dict[str, Any]] = []
    for n in s.fanout_clients:
        for rep in range(s.reps):
            if world.over_budget():
                result.errors.append(f"time budget exceeded: skipped fanout n={n} from rep {rep}")
                break
            for system in world.systems(rep, NGINX_CACHE):
                rec = await guarded(
                    result,
                    world,
                    f"{system} fanout n={n} rep={rep}",
                    _cold_round(world, system, n, rep),
                )
                if rec:
                    records.append(rec)
    world.cold_records.extend(records)
    table = Table("a. cold fan-out: N clients on one uncached blob", COLD_COLUMNS)
    table.notes.append(_link_note(world))
    table.notes.append(
        "wall: first request -> last byte of the last client; ttfb: request -> first body "
        "byte per client (p50 and max over clients); link/blob: bytes the cache pulled "
        "across the link / blob size"
    )
    table.notes.append(noise_note(records))
    by_n = {n: _cold_rows(table, records, n) for n in s.fanout_clients}
    result.tables.append(table)
    top = max(s.fanout_clients)
    rows = by_n.get(top, {})
    if MIRROR in rows:
        m = rows[MIRROR]
        world.target(
            f"fan-out {top}: link bytes / blob",
            "<= 1.02",
            m["link_per_blob"],
            m["link_per_blob"] <= 1.02,
            "{:.3f}",
        )
        world.target(
            f"fan-out {top}: first byte to every client",
            "<= 0.5 s",
            m["ttfb_max_s"],
            m["ttfb_max_s"] <= 0.5,
            "{:.3f} s",
        )
        if NGINX_CACHE in rows:
            r = ratio(m["wall_s"], rows[NGINX_CACHE]["wall_s"])
            world.target(
                f"fan-out {top}: wall time vs nginx proxy_cache", "<= 0.5x", r, r <= 0.5, "{:.3f}x"
            )
        world.target(
            f"fan-out {top}: every client got the right sha256",
            f"{top}/{top}",
            float(m["ok"].split("/")[0]),
            m["ok"] == f"{top}/{top}",
            "{:.0f}",
        )
        # Cold streaming holds the most per-client state: the memory target applies here too.
        world.target(
            f"memory: mirror peak RSS, cold fan-out {top} clients",
            "< 200 MB",
            m["peak_rss_mb"],
            m["peak_rss_mb"] < 200,
            "{:.0f} MB",
        )
    return result


async def cold_single(world: World) -> ScenarioResult:
    """b. One cold client across the per-connection-capped link: ranged streams vs one stream."""
    result = ScenarioResult("single")
    s = world.settings
    # A fan-out round with one client is exactly this measurement: reuse it when a. ran.
    records = [r for r in world.cold_records if r["clients"] == 1]
    reused = len(records)
    for rep in range(reused // max(1, len(world.systems(0, NGINX_CACHE))), s.reps):
        if world.over_budget():
            result.errors.append(f"time budget exceeded: skipped single from rep {rep}")
            break
        for system in world.systems(rep, NGINX_CACHE):
            rec = await guarded(
                result,
                world,
                f"{system} single rep={rep}",
                _cold_round(world, system, 1, rep),
            )
            if rec:
                records.append(rec)
    table = Table("b. one cold client over the capped link", COLD_COLUMNS)
    size = world.big.layers[0].size
    floor_one = size / (s.rate_mbps * 1e6)
    table.notes.append(_link_note(world))
    table.notes.append(
        f"link floor: {floor_one:.2f} s for one stream, {floor_one / 8:.2f} s for 8 streams "
        "(plus round trips)"
    )
    table.notes.append(noise_note(records))
    if reused:
        table.notes.append(f"{reused} rounds shared with a. (fan-out, 1 client)")
    rows = _cold_rows(table, records, 1)
    if MIRROR in rows:
        reqs = group_by(records, "system").get((MIRROR,), [])
        kinds = sorted({k for r in reqs for k in r["link_requests"]})
        table.notes.append(
            "mirror upstream requests per repetition: "
            + ", ".join(
                f"{k} x{median(r['link_requests'].get(k, 0) for r in reqs):g}" for k in kinds
            )
        )
    result.tables.append(table)
    if MIRROR in rows and NGINX_CACHE in rows:
        r = ratio(rows[MIRROR]["wall_s"], rows[NGINX_CACHE]["wall_s"])
        world.target(
            "one cold client: time vs nginx proxy_cache", "<= 0.2x", r, r <= 0.2, "{:.3f}x"
        )
    return result


# --------------------------------------------------------------------------- warm serving
