"""f. regional: the tier past one process. Three replicas as one cache against one replica,
the S3 level against the origin, and redirects against streaming, all on the same blob.

- replicas: 50 cold clients spread round-robin over 3 replicas with [cluster] peers, and
  the same 50 on one replica: bytes across the link per blob, first byte, wall time.
- cold from S3: 1 and 50 cold clients on a replica whose disk is empty but whose bucket
  holds the blob, against the same replica filling from the origin across the link.
- redirect: 50 clients on a cached blob known to be in the bucket, redirects off (the
  mirror streams it) and on (a 307 each, the bytes from S3): bytes leaving the mirror, its
  CPU per GB the clients got.

moto plays S3 on loopback: it is a Python server, so the redirect round's wall time says
how fast moto is, not S3; the mirror's bytes and CPU are the figures that transfer.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import clients
from .procs import NoiseMeter, cpu_seconds, free_port
from .report import Column, ScenarioResult, Table, ratio
from .scale_targets import MirrorFleet, MirrorSpec, MotoS3, cluster_specs, s3_section
from .world import World, group_by, guarded, med, noise_note, settle

ONE, THREE = "1 replica", "3 replicas"
ORIGIN_FILL, S3_FILL = "cold from the origin", "cold from S3"
STREAMED, REDIRECTED = "redirect off", "redirect on"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def scrape(base: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def served_itself(base: str) -> float:
    """Body bytes the mirror sent its clients (not the ones it sent to S3 by redirect)."""
    return sum(
        scrape(base, "mirror_served_bytes_total", source=s)
        for s in ("disk", "s3", "peer", "origin")
    )


class Shapes:
    """The fleets of this scenario, started on demand, stopped at the end."""

    def __init__(self, world: World, workdir: Path) -> None:
        assert world.mirror is not None
        self.world = world
        self.moto = MotoS3(workdir)
        self.moto.start()
        s3 = s3_section(self.moto.url, self.moto.bucket)
        common = dict(source=world.mirror.source, link=world.link_addr, registry="bench")

        def admin() -> str:
            return f'admin_listen = "127.0.0.1:{free_port()}"\n'

        ports = [free_port() for _ in range(3)]
        self.fleets = {
            ONE: MirrorFleet(ONE, workdir=workdir / "one", specs=[MirrorSpec(admin())], **common),
            THREE: MirrorFleet(
                THREE, workdir=workdir / "three",
                specs=cluster_specs(ports, admin_ports=[free_port() for _ in ports]),
                ports=ports, **common,
            ),
            "s3": MirrorFleet(
                "s3", workdir=workdir / "s3", specs=[MirrorSpec(admin(), s3)], env=AWS,
                **common,
            ),
            "s3 filler": MirrorFleet(
                "s3 filler", workdir=workdir / "filler", specs=[MirrorSpec(admin(), s3)],
                env=AWS, **common,
            ),
            "redirect": MirrorFleet(
                "redirect", workdir=workdir / "redirect",
                specs=[MirrorSpec(admin(), s3 + "redirect = true\n")], env=AWS, **common,
            ),
        }  # fmt: skip

    def stop(self) -> None:
        self.quiet()
        self.moto.stop()

    def quiet(self) -> None:
        """Every fleet stopped: none may upload into a bucket a round has just emptied."""
        for fleet in self.fleets.values():
            fleet.stop()

    async def empty_bucket(self) -> None:
        await asyncio.to_thread(self.quiet)
        await asyncio.to_thread(self.moto.empty)

    async def fill_bucket(self, path: str) -> None:
        """The blob in an emptied bucket (a replica pulls it from the origin, uploads it)."""
        await self.empty_bucket()
        filler = self.fleets["s3 filler"]
        await asyncio.to_thread(filler.fresh)
        base = filler.urls()[0]
        status, _, _ = await clients.fetch(base + path)
        assert status == 200, f"filler answered {status}"
        for _ in range(600):
            if scrape(base, "mirror_s3_uploads_total", result="done") >= 1:
                await asyncio.to_thread(filler.stop)
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the blob was not uploaded to the bucket within 60 s")


async def _round(
    world: World, shapes: Shapes, part: str, system: str, n: int, rep: int
) -> dict[str, Any]:
    blob = world.big.layers[0]
    path = f"/v2/{world.big.name}/blobs/{blob.digest}"
    if part == "replicas":
        fleet = shapes.fleets[system]
        await asyncio.to_thread(shapes.quiet)
        await asyncio.to_thread(fleet.fresh)
    elif part == "cold":
        fleet = shapes.fleets["s3"]
        if system == S3_FILL:
            await shapes.fill_bucket(path)
        else:
            await shapes.empty_bucket()
        await asyncio.to_thread(fleet.fresh)  # an empty disk; the bucket as the step left it
    else:
        fleet = shapes.fleets["redirect" if system == REDIRECTED else "s3"]
        await shapes.fill_bucket(path)
        await asyncio.to_thread(fleet.fresh)
        for base in fleet.urls():  # cached locally, and known to be in the bucket
            await clients.fetch(base + path, "HEAD")
            await clients.fetch(base + path)
    urls = [u + path for u in fleet.urls()]
    served0 = sum(served_itself(u) for u in fleet.urls())
    world.link.reset()
    noise = NoiseMeter(world.pids() + fleet.pids())
    cpu0 = sum(cpu_seconds(p) for p in fleet.pids())
    fan = await clients.fan_out(urls, n, blob.digest, world.settings.client_timeout)
    await settle()
    cpu = sum(cpu_seconds(p) for p in fleet.pids()) - cpu0
    link = world.link.stats()
    ttfbs = [d.ttfb for d in fan.downloads if not math.isnan(d.ttfb)]
    got = sum(d.size for d in fan.downloads)
    return {
        "part": part, "system": system, "clients": n, "rep": rep, "wall_s": fan.wall,
        "ttfb_max_s": max(ttfbs, default=math.nan),
        "ok": sum(d.digest_ok for d in fan.downloads),
        "link_per_blob": link["bytes_down"] / blob.size,
        "server_cpu_s": cpu, "cpu_s_per_gb": cpu / (got / 1e9) if got else math.nan,
        "served_itself_gb": (sum(served_itself(u) for u in fleet.urls()) - served0) / 1e9,
        "delivered_gb": got / 1e9, **noise.stop(),
    }  # fmt: skip


PLAN = [
    ("replicas", (ONE, THREE), (50,)),
    ("cold", (ORIGIN_FILL, S3_FILL), (1, 50)),
    ("redirect", (STREAMED, REDIRECTED), (50,)),
]
COLUMNS = [
    Column("part", "part", left=True),
    Column("clients", "clients", "{}"),
    Column("system", "system", left=True),
    Column("wall_s", "wall s"),
    Column("ttfb_max_s", "ttfb max s"),
    Column("link_per_blob", "link/blob", "{:.3f}"),
    Column("ok", "sha256 ok"),
    Column("server_cpu_s", "mirror cpu s", "{:.2f}"),
    Column("cpu_s_per_gb", "cpu s/GB served", "{:.2f}"),
    Column("served_itself_gb", "GB sent by mirror", "{:.2f}"),
    Column("delivered_gb", "GB clients got", "{:.2f}"),
]


async def regional(world: World) -> ScenarioResult:
    result = ScenarioResult("regional")
    if world.mirror is None:
        result.errors.append("the mirror is not available")
        return result
    shapes = Shapes(world, world.workdir / "regional")
    records: list[dict[str, Any]] = []
    try:
        for part, systems, counts in PLAN:
            for n in counts:
                for rep in range(world.settings.reps):
                    if world.over_budget():
                        result.errors.append(f"time budget exceeded: skipped {part} n={n}")
                        break
                    order = systems if rep % 2 == 0 else tuple(reversed(systems))
                    for system in order:
                        print(f"  regional {part} {system} n={n} rep={rep}", flush=True)
                        rec = await guarded(
                            result, world, f"regional {part} {system} n={n} rep={rep}",
                            _round(world, shapes, part, system, n, rep),
                        )  # fmt: skip
                        if rec:
                            records.append(rec)
    finally:
        await asyncio.to_thread(shapes.stop)
    table = Table("f. regional: replicas as one cache, the S3 level, redirects", COLUMNS)
    table.notes.append(
        f"blob {world.big.layers[0].size >> 20} MiB; medians of {world.settings.reps} "
        "repetitions; S3 is moto on loopback (no link), the origin is across the link"
    )
    table.notes.append(noise_note(records))
    groups = group_by(records, "part", "clients", "system")
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for (part, n, system), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        row = {
            "part": part, "clients": n, "system": system,
            **{k: med(group, k) for k in (
                "wall_s", "ttfb_max_s", "link_per_blob", "server_cpu_s", "cpu_s_per_gb",
                "served_itself_gb", "delivered_gb",
            )},
            "ok": f"{min(r['ok'] for r in group)}/{n}",
        }  # fmt: skip
        rows[(part, n, system)] = row
        table.add(**row)
    result.tables.append(table)
    _targets(world, rows)
    return result


def _targets(world: World, rows: dict[tuple[str, int, str], dict[str, Any]]) -> None:
    three, one = rows.get(("replicas", 50, THREE)), rows.get(("replicas", 50, ONE))
    if three is not None:
        world.target(
            "3 replicas, 50 cold clients: link bytes / blob", "<= 1.02",
            three["link_per_blob"], three["link_per_blob"] <= 1.02, "{:.3f}",
        )  # fmt: skip
        world.target(
            "3 replicas, 50 cold clients: first byte to every client", "<= 0.5 s",
            three["ttfb_max_s"], three["ttfb_max_s"] <= 0.5, "{:.3f} s",
        )  # fmt: skip
        if one is not None:
            world.target(
                "3 replicas vs 1, 50 cold clients: wall time", "(report)",
                ratio(three["wall_s"], one["wall_s"]), None, "{:.2f}x",
            )  # fmt: skip
    for n in (1, 50):
        s3, origin = rows.get(("cold", n, S3_FILL)), rows.get(("cold", n, ORIGIN_FILL))
        if s3 is not None and origin is not None:
            world.target(
                f"cold from S3 vs from the origin, {n} client(s): wall time", "(report)",
                ratio(s3["wall_s"], origin["wall_s"]), None, "{:.2f}x",
            )  # fmt: skip
            world.target(
                f"cold from S3, {n} client(s): link bytes / blob", "0",
                s3["link_per_blob"], s3["link_per_blob"] < 0.01, "{:.3f}",
            )  # fmt: skip
    on, off = rows.get(("redirect", 50, REDIRECTED)), rows.get(("redirect", 50, STREAMED))
    if on is not None and off is not None:
        share = ratio(on["served_itself_gb"], on["delivered_gb"])
        world.target(
            "redirect on, 50 warm clients: bytes sent by the mirror / bytes delivered",
            "~0", share, share < 0.01, "{:.3f}",
        )  # fmt: skip
        world.target(
            "redirect on vs off, 50 warm clients: mirror CPU s", "(report)",
            ratio(on["server_cpu_s"], off["server_cpu_s"]), None, "{:.2f}x",
        )  # fmt: skip
