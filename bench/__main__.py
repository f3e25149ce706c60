"""Entry point: `python -m bench [scenario ...] [--quick]` starts everything, runs, reports, stops.

Scenarios: fanout (a), single (b), warm (c), manifests (d), load (e); none named means
all of those. `scaleout` (N fresh nodes pull one multi-layer image) runs only when named.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import peers
from .floor import Floor
from .link import LinkControl
from .procs import BenchError, Process, free_port, http_status, tool_version
from .report import ScenarioResult, write_json
from .scenarios import ALIASES, EXPLICIT, SCENARIOS
from .target import REPO_ROOT, Mirror, mirror_available, snapshot_source
from .upstream import Registry, push_image
from .world import ScaleSettings, Settings, World, targets_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="scenario",
        help=f"any of {', '.join(SCENARIOS)} (or {' '.join(ALIASES)}); default: all but scaleout",
    )
    p.add_argument("--quick", action="store_true", help="32 MiB blob, 1 s load runs (~2 min)")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 3)")
    p.add_argument("--blob-mib", type=int, help="big layer size (default 128, quick 32)")
    p.add_argument("--latency-ms", type=float, default=20.0, help="one-way link latency")
    p.add_argument("--rate-mbps", type=float, default=25.0, help="link MB/s per TCP connection")
    p.add_argument(
        "--nginx-workers",
        type=int,
        default=1,
        help="nginx worker_processes (default 1: the mirror is one process)",
    )
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk -t for N > 1 clients")
    p.add_argument("--warm-seconds", type=float, help="wrk duration per warm run (5, quick 1)")
    p.add_argument("--manifest-seconds", type=float, help="duration per manifest run (3, quick 1)")
    p.add_argument("--peers-only", action="store_true", help="do not start the mirror")
    p.add_argument("--workdir", type=Path, help="where registry, caches and logs live (tmp)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs) afterwards")
    g = p.add_argument_group("scaleout")
    g.add_argument("--nodes", help="burst sizes N, comma-separated (default 10,50,100; quick 5,20)")
    g.add_argument("--image-mib", type=int, help="image size (default 192, quick 48; GiBs work)")
    g.add_argument("--layers", type=int, help="layers in the image (default 4, quick 3)")
    g.add_argument("--node-mbps", type=float, default=100.0, help="each node's NIC, MB/s")
    g.add_argument("--window", type=float, help="nodes arrive over this many s (5, quick 2)")
    g.add_argument(
        "--verify-fraction", type=float, default=0.1, help="share of nodes hashing every byte"
    )
    g.add_argument("--ctr-nodes", type=int, help="real containerd nodes per burst (3, quick 1)")
    g.add_argument(
        "--limit-per-node",
        type=float,
        default=0.5,
        help="limited phase: manifest GETs the origin allows per node of the burst",
    )
    g.add_argument("--phases", default="cold,warm,limited", help="scaleout phases to run")
    g.add_argument("--targets", default="", help="scaleout targets by name, comma-separated")
    args = p.parse_args(argv)
    names = []
    for name in args.scenarios:
        name = ALIASES.get(name, name)
        if name not in SCENARIOS:
            p.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        names.append(name)
    args.scenarios = names or [n for n in SCENARIOS if n not in EXPLICIT]
    return args


def scale_settings(args: argparse.Namespace) -> ScaleSettings:
    quick = args.quick
    nodes = args.nodes or ("5,20" if quick else "10,50,100")
    return ScaleSettings(
        nodes=tuple(int(x) for x in nodes.split(",") if x.strip()),
        image_bytes=(args.image_mib or (48 if quick else 192)) << 20,
        layers=args.layers or (3 if quick else 4),
        nic_mbps=args.node_mbps,
        window_s=args.window if args.window is not None else (2.0 if quick else 5.0),
        verify_fraction=max(0.0, min(1.0, args.verify_fraction)),
        ctr_nodes=args.ctr_nodes if args.ctr_nodes is not None else (1 if quick else 3),
        limit_per_node=args.limit_per_node,
        phases=tuple(x.strip() for x in args.phases.split(",") if x.strip()),
        targets=tuple(x.strip() for x in args.targets.split(",") if x.strip()),
        node_timeout=900.0,
    )


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    reps = args.reps or 3
    return Settings(
        quick=quick,
        reps=max(1, min(reps, 50)),
        blob_size=(args.blob_mib or (32 if quick else 128)) << 20,
        fanout_clients=(1, 10, 50),
        warm_clients=(1, 50),
        manifest_clients=(1, 10, 50),
        warm_seconds=args.warm_seconds or (1.0 if quick else 5.0),
        manifest_seconds=args.manifest_seconds or (1.0 if quick else 3.0),
        latency_ms=args.latency_ms,
        rate_mbps=args.rate_mbps,
        nginx_workers=args.nginx_workers,
        wrk_threads=args.wrk_threads,
        client_timeout=300.0,
        # A hard stop well past the expected 2 / 10 minutes: later rounds are skipped, noted;
        # a scale-out adds its own share, growing with the image.
        budget_seconds=(240.0 if quick else 1200.0) * max(1.0, reps / 3)
        + (
            (900.0 if quick else 5400.0)
            * max(1.0, reps / 3)
            * max(1.0, (args.image_mib or 0) / 256)
            if "scaleout" in args.scenarios
            else 0.0
        ),
    )


def meta(settings: Settings, mirror_state: str, loadavg_start: Any) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO_ROOT)
        return out.stdout.strip() or out.stderr.strip()

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings.__dict__,
        "mirror": mirror_state,
        "git_head": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(git("status", "--porcelain").splitlines()),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "nginx": tool_version(["nginx", "-v"]),
        "docker_registry": tool_version(["docker-registry", "--version"]),
        "wrk": tool_version(["wrk", "-v"]),
        "ab": tool_version(["ab", "-V"]),
    }


async def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}", file=sys.stderr)
    source = workdir / "src"
    snapshot = snapshot_source(source) if not args.peers_only else ""
    ok, why = (False, "--peers-only") if args.peers_only else mirror_available(source)
    mirror_state = f"running (source snapshot {snapshot})" if ok else f"unavailable ({why})"
    if not ok:
        print(f"mirror {mirror_state}: measuring the peers only", file=sys.stderr)
    results: list[ScenarioResult] = []
    started, loadavg_start = time.monotonic(), os.getloadavg()
    with ExitStack() as stack:
        registry = Registry(workdir / "registry", free_port(), workdir / "logs" / "registry.log")
        stack.callback(registry.stop)
        registry.start()
        static_root = workdir / "static"
        t0 = time.monotonic()
        big = await push_image(
            registry.url, "perf/big", "v1", [settings.blob_size], workdir, static_root
        )
        small = await push_image(registry.url, "perf/small", "v1", [4096], workdir, static_root)
        print(f"pushed images in {time.monotonic() - t0:.1f}s", file=sys.stderr)

        link_port, control_port = free_port(), free_port()
        link = Process(
            "link-emulator",
            [
                sys.executable,
                "-m",
                "bench.link",
                "--listen",
                f"127.0.0.1:{link_port}",
                "--upstream",
                f"127.0.0.1:{registry.port}",
                "--control",
                f"127.0.0.1:{control_port}",
                "--latency-ms",
                str(settings.latency_ms),
                "--rate-mbps",
                str(settings.rate_mbps),
                "--max-seconds",
                str(settings.budget_seconds + 600),
            ],
            workdir / "logs" / "link.log",
            cwd=REPO_ROOT,
        )
        stack.callback(link.stop)
        link.start()
        link.wait_ready(lambda: http_status(f"http://127.0.0.1:{control_port}/stats") == 200)

        proxy = peers.proxy_cache(
            workdir / "nginx-proxy-cache",
            free_port(),
            f"127.0.0.1:{link_port}",
            settings.nginx_workers,
        )
        stack.callback(proxy.stop)
        proxy.start()
        static = peers.static(
            workdir / "nginx-static", free_port(), static_root, [big, small], settings.nginx_workers
        )
        stack.callback(static.stop)
        static.start()
        floor = Floor(
            free_port(),
            static_root,
            small.media_type,
            workdir / "logs" / "floor.log",
            settings.budget_seconds + 600,
        )
        stack.callback(floor.stop)
        floor.start()
        mirror = None
        if ok:
            mirror = Mirror(workdir / "mirror", free_port(), f"127.0.0.1:{link_port}", source)
            stack.callback(mirror.stop)

        world = World(
            settings,
            workdir,
            LinkControl(f"127.0.0.1:{control_port}", link.pid),
            big,
            small,
            proxy,
            static,
            floor,
            mirror,
            registry_pid=registry.process.pid,
            registry_url=registry.url,
            link_addr=f"127.0.0.1:{link_port}",
            scale=scale_settings(args),
        )
        for name in args.scenarios:
            print(f"== {name}", file=sys.stderr, flush=True)
            t = time.monotonic()
            result = await SCENARIOS[name](world)
            result.seconds = time.monotonic() - t
            results.append(result)
            print("\n" + result.render() + "\n", flush=True)
        targets = targets_table(world)
        if targets.rows:
            print(targets.render() + "\n")
        info = meta(settings, mirror_state, loadavg_start)
        info["seconds"] = time.monotonic() - started
        info["loadavg_end"] = os.getloadavg()
        info["targets"] = world.targets
        if mirror is not None:
            info["mirror_startup_s"] = mirror.startup_seconds
        path = write_json(info, results, settings.quick)
        print(f"results: {path.relative_to(REPO_ROOT)}  ({info['seconds']:.0f} s)")
    if args.keep or args.workdir:
        print(f"kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.errors for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, frame: Any) -> None:
        # SIGTERM unwinds like Ctrl-C so the ExitStack stops every child we started.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        import uvloop

        return uvloop.run(run(args))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
