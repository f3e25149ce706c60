"""Shared ground for the scenarios: settings, the running processes, and one round's helpers.

Every repetition runs the mirror and its peers back to back, rotating which goes first,
so the noise of a shared machine lands on both sides of each ratio alike.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .floor import Floor
from .link import LinkControl
from .peers import Nginx
from .procs import NoiseMeter, cpu_seconds, rss_bytes
from .report import Column, ScenarioResult, Table, median
from .target import Mirror
from .upstream import Image

MIRROR, NGINX_CACHE, NGINX_STATIC = "mirror", "nginx proxy_cache", "nginx static"
FLOOR = "aiohttp floor"


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    blob_size: int
    fanout_clients: tuple[int, ...]
    warm_clients: tuple[int, ...]
    manifest_clients: tuple[int, ...]
    warm_seconds: float
    manifest_seconds: float
    latency_ms: float
    rate_mbps: float
    nginx_workers: int
    wrk_threads: int
    client_timeout: float
    budget_seconds: float


@dataclass(frozen=True)
class ScaleSettings:
    """The scale-out scenario's knobs (python -m bench scaleout --help)."""

    nodes: tuple[int, ...]  # burst sizes N
    image_bytes: int
    layers: int
    nic_mbps: float  # each node's NIC, MB/s (1e6 bytes), all its connections together
    window_s: float  # nodes arrive evenly over this many seconds
    verify_fraction: float  # share of simulated nodes that hash every byte
    ctr_nodes: int  # real containerd nodes in each cold and warm burst
    limit_per_node: float  # manifest GETs the limited origin allows per node in the burst
    phases: tuple[str, ...]
    targets: tuple[str, ...]  # names to run; empty: all
    node_timeout: float


@dataclass
class World:
    """Everything the scenarios share, started once by __main__."""

    settings: Settings
    workdir: Path
    link: LinkControl
    big: Image
    small: Image
    proxy: Nginx
    static: Nginx
    floor: Floor
    mirror: Mirror | None
    started: float = field(default_factory=time.monotonic)
    targets: list[dict[str, Any]] = field(default_factory=list)
    cold_records: list[dict[str, Any]] = field(default_factory=list)  # shared by a. and b.
    registry_pid: int = 0
    registry_url: str = ""  # the origin itself (for pushing images), not across the link
    link_addr: str = ""  # host:port of the link emulator: the origin as caches see it
    scale: ScaleSettings | None = None

    def pids(self) -> list[int]:
        """Every long-lived process of the benchmark, for telling its CPU from foreign load."""
        pids = [self.registry_pid, self.link.pid, self.floor.pid, self.static.pid]
        for server in (self.proxy, self.mirror):
            if server is not None and server.process is not None:
                pids.append(server.pid)
        return [p for p in pids if p]

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.settings.budget_seconds

    def systems(self, rep: int, *peers: str) -> list[str]:
        """Run order for one repetition: rotate who goes first."""
        order = [MIRROR, *peers] if self.mirror is not None else list(peers)
        k = rep % len(order)
        return order[k:] + order[:k]

    def target(self, what: str, goal: str, measured: float, ok: bool | None, fmt: str) -> None:
        shown = "-" if math.isnan(measured) else fmt.format(measured)
        verdict = "n/a" if ok is None or math.isnan(measured) else ("PASS" if ok else "FAIL")
        self.targets.append({"target": what, "goal": goal, "measured": shown, "verdict": verdict})


async def settle() -> None:
    # Let the last bytes a cache pulled reach the counters (the link delays them by latency).
    await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- one round


async def guarded(
    result: ScenarioResult, world: World, what: str, round_: Coroutine[Any, Any, dict[str, Any]]
) -> dict[str, Any] | None:
    """Await one round; a failure is recorded (with the mirror's log tail) and the run goes on."""
    try:
        record = await round_
    except Exception as exc:  # noqa: BLE001 - one broken round must not lose the others
        detail = f"{what}: {type(exc).__name__}: {exc}"
        if world.mirror is not None and what.startswith(MIRROR):
            detail += f"\n--- mirror log tail ---\n{world.mirror.log_tail(3000)}"
        result.errors.append(detail)
        traceback.print_exc()
        return None
    result.reps.append(record)
    print(f"  {what}: " + _brief(record), file=sys.stderr, flush=True)
    return record


def _brief(record: dict[str, Any]) -> str:
    """One progress line per round, so a long run shows it is alive."""
    keys = (
        "wall_s",
        "ttfb_max_s",
        "link_per_blob",
        "ok",
        "gb_per_s",
        "bytes_per_s",
        "rps",
        "p99_ms",
        "link_requests",
    )
    parts = []
    for k in keys:
        v = record.get(k)
        if isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        elif isinstance(v, int):
            parts.append(f"{k}={v}")
    return " ".join(parts)


def group_by(
    records: list[dict[str, Any]], *keys: str
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def med(records: list[dict[str, Any]], key: str) -> float:
    return median(r[key] for r in records)


def noise_note(records: list[dict[str, Any]]) -> str:
    other = [r["other_cpu_per_s"] for r in records if "other_cpu_per_s" in r]
    steal = [r["steal_pct"] for r in records if "steal_pct" in r]
    if not other:
        return "no rounds measured"
    return (
        f"foreign load during rounds: median {median(other):.2f} cores busy with processes "
        f"outside the benchmark (max {max(other):.2f}), steal {median(steal):.1f}%; "
        "+-%: (max - min) / median over repetitions"
    )


async def _sample_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    """VmRSS of the tree every 50 ms while a load runs (bounded by the load's duration)."""
    for _ in range(100_000):
        peak[0] = max(peak[0], rss_bytes(pid))
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
            return
        except TimeoutError:
            continue


async def load_round(
    world: World,
    system: str,
    rep: int,
    n: int,
    kind: str,
    run: Callable[[str], dict[str, Any]],
    path: str,
) -> dict[str, Any]:
    """One load-generator run against a warm server, with its CPU, RSS and link requests."""
    if system == MIRROR:
        assert world.mirror is not None
        base, pid = world.mirror.url, world.mirror.pid
    elif system == FLOOR:
        base, pid = world.floor.url, world.floor.pid
    else:
        base, pid = world.static.url, world.static.pid
    world.link.reset()
    noise = NoiseMeter(world.pids())
    cpu0 = cpu_seconds(pid)
    stop, peak = asyncio.Event(), [0]
    sampler = asyncio.create_task(_sample_rss(pid, stop, peak))
    try:
        out = await asyncio.to_thread(run, base + path)
    finally:
        stop.set()
        await sampler
    cpu = cpu_seconds(pid) - cpu0
    load = noise.stop()
    await settle()
    link = world.link.stats()
    return {
        "system": system,
        "kind": kind,
        "clients": n,
        "rep": rep,
        **{k: v for k, v in out.items() if k != "raw"},
        "server_cpu_s": cpu,
        "rss_max": peak[0],
        "link_requests": link["requests_total"],
        "link_detail": link["requests"],
        **load,
    }


async def fresh_warm_mirror(world: World, result: ScenarioResult) -> bool:
    """Start a mirror on an empty cache; False (with the error recorded) if it will not run."""
    if world.mirror is None:
        return False
    try:
        await asyncio.to_thread(world.mirror.fresh)
        return True
    except Exception as exc:  # noqa: BLE001 - recorded; the peers still get measured
        result.errors.append(f"mirror did not start: {exc}")
        return False


def targets_table(world: World) -> Table:
    table = Table(
        "Targets (DESIGN.md section 5), from this run",
        [
            Column("target", "target", left=True),
            Column("goal", "goal"),
            Column("measured", "measured"),
            Column("verdict", "verdict"),
        ],
    )
    for t in world.targets:
        table.add(**t)
    return table
