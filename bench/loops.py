"""Event loop and sendfile, measured once: is uvloop with the sendfile threads still faster
than the default asyncio loop with aiohttp's web.FileResponse on a cached blob, and uvloop
than asyncio on cached manifests? (DESIGN.md, "Serving cached bytes fast"; issue 9.)

    python -m bench.loops [--blob-mib 128] [--seconds 5] [--reps 3] [--quick] [--keep]

Systems, each its own process, measured back to back in rotating order per repetition:
- blobs, 1 and 50 keep-alive wrk clients on one cached blob: a bare aiohttp app sending it
  with the mirror's own send_file on uvloop (`threads/uvloop`), the same app sending it with
  web.FileResponse on the default loop (`FileResponse/asyncio`), the mirror itself (`mirror
  serve`, filled from a local upstream) on uvloop and on asyncio, and nginx static (sendfile)
  as the peer;
- manifests, 1 and 50 keep-alive clients, HEAD by tag (ab) and GET by digest (wrk): the
  mirror on uvloop and on asyncio, fast path on as by default.
Figures: GB/s or req/s, p99, server CPU seconds per GB (blobs), ratios to nginx or to uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import clients
from .peers import static
from .procs import NoiseMeter, Process, cpu_seconds, free_port, http_status
from .report import median, ratio, spread_pct
from .upstream import Blob, Image

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "perf/big"
OCI = "application/vnd.oci.image.manifest.v1+json"
MIRROR_TOML = """\
default_registry = "bench"
[server]
listen = "127.0.0.1:{port}"
access_log = false
[cache]
dir = "{cache}"
[registries.bench]
url = "http://127.0.0.1:{upstream}"
"""


# -- children ---------------------------------------------------------------------------------


def _blob_app(path: Path, digest: str, send: str) -> Any:
    """A bare app serving one file as the mirror serves a cached blob, one of two ways."""
    from concurrent.futures import ThreadPoolExecutor

    from aiohttp import web

    from mirror.config import Config
    from mirror.http.sendfile import Sent, send_file
    from mirror.keys import config_key

    headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
    size = path.stat().st_size
    pool = ThreadPoolExecutor(64, thread_name_prefix="sendfile")

    async def blob(request: web.Request) -> web.StreamResponse:
        if send == "fileresponse":
            return web.FileResponse(path, headers=headers)
        response = web.StreamResponse(headers=headers)
        await send_file(request, path, 0, size - 1, response, pool, Sent())
        return response

    app = web.Application()
    app[config_key] = Config()  # send_file reads the idle timeout from it
    app.router.add_get(f"/v2/{NAME}/blobs/{digest}", blob)
    app.router.add_get("/ready", lambda _: web.Response(text="ok"))
    return app


def _upstream_app(root: Path) -> Any:
    """The origin for the mirror's one fill: the manifest by tag and digest, and blobs."""
    from aiohttp import web

    manifest = (root / "manifest.json").read_bytes()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    async def manifests(request: web.Request) -> web.Response:
        if request.match_info["ref"] not in ("v1", digest):
            return web.Response(status=404)
        headers = {"Content-Type": OCI, "Docker-Content-Digest": digest}
        return web.Response(body=manifest, headers=headers)

    async def blobs(request: web.Request) -> web.StreamResponse:
        path = root / "v2" / NAME / "blobs" / request.match_info["digest"]
        return web.FileResponse(path) if path.is_file() else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/v2/", lambda _: web.json_response({}))
    app.router.add_get(f"/v2/{NAME}/manifests/{{ref}}", manifests)
    app.router.add_get(f"/v2/{NAME}/blobs/{{digest}}", blobs)
    return app


def _child(argv: list[str]) -> None:
    from aiohttp import web

    kind, loop_name, rest = argv[0], argv[1], argv[2:]
    if kind == "mirror":
        from mirror.cli.serve import serve
        from mirror.config import load_config

        coro: Any = serve(load_config({}, Path(rest[0])))
    else:
        port = int(rest[0])
        if kind == "blob":
            app = _blob_app(Path(rest[1]), rest[2], rest[3])
        else:
            app = _upstream_app(Path(rest[1]))

        async def run() -> None:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
            await asyncio.Event().wait()

        coro = run()
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


# -- harness ----------------------------------------------------------------------------------


class System:
    def __init__(self, name: str, process: Process | None, url: str, pid: Any = None) -> None:
        self.name, self.process, self.url = name, process, url
        self._pid = pid

    @property
    def pid(self) -> int:
        return self._pid() if callable(self._pid) else self.process.pid  # type: ignore[union-attr]


def _spawn(workdir: Path, name: str, args: list[str], ready: str) -> Process:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this tree's mirror, not an install
    argv = [sys.executable, "-m", "bench.loops", "--child", *args]
    process = Process(name, argv, workdir / f"{name}.log", env=env, cwd=REPO_ROOT).start()
    process.wait_ready(lambda: http_status(ready) == 200, timeout=30)
    return process


def _image(root: Path, blob_mib: int) -> Image:
    """One random layer on disk, a config and an OCI manifest naming them, laid out as nginx
    static and the upstream serve them."""
    blobs = root / "v2" / NAME / "blobs"
    blobs.mkdir(parents=True)
    data = os.urandom(blob_mib << 20)
    config = b'{"architecture":"amd64","os":"linux"}'
    made = []
    for body in (config, data):
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        (blobs / digest).write_bytes(body)
        made.append(Blob(digest, len(body), blobs / digest))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": made[0].digest, "size": made[0].size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": made[1].digest, "size": made[1].size}],
    }).encode()  # fmt: skip
    (root / "manifest.json").write_bytes(manifest)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    manifests = root / "v2" / NAME / "manifests"
    manifests.mkdir(parents=True)
    for ref in ("v1", digest):
        (manifests / ref).write_bytes(manifest)
    return Image(NAME, "v1", manifest, digest, OCI, made[0], (made[1],))


def _measure(system: System, run: Any) -> dict[str, Any]:
    """One load run, the CPU the server used meanwhile, and what others used (the box is
    shared: a run next to someone's test suite is not comparable with a quiet one)."""
    before = cpu_seconds(system.pid)
    noise = NoiseMeter([system.pid])
    out = dict(run(system.url))
    out["server_cpu_s"] = cpu_seconds(system.pid) - before
    out["other_cpu"] = noise.stop()["other_cpu_per_s"]
    return out


def _rows(records: list[dict[str, Any]], key: str) -> dict[tuple[str, int], list[float]]:
    grouped: dict[tuple[str, int], list[float]] = {}
    for r in records:
        grouped.setdefault((r["system"], r["clients"]), []).append(r[key])
    return grouped


def _start_systems(workdir: Path, image: Image, started: list[Process]) -> list[System]:
    """The upstream, the two bare blob servers and the two mirrors (filled), in `started`."""
    layer = image.layers[0]
    up_port = free_port()
    up_args = ["upstream", "asyncio", str(up_port), str(workdir / "root")]
    started.append(_spawn(workdir, "upstream", up_args, f"http://127.0.0.1:{up_port}/v2/"))
    systems = []
    for loop_name, send, name in (
        ("uvloop", "threads", "threads/uvloop"),
        ("asyncio", "fileresponse", "FileResponse/asyncio"),
    ):
        port = free_port()
        blob_args = ["blob", loop_name, str(port), str(layer.path), layer.digest, send]
        url = f"http://127.0.0.1:{port}"
        started.append(_spawn(workdir, name.replace("/", "-"), blob_args, url + "/ready"))
        systems.append(System(name, started[-1], url))
    for loop_name in ("uvloop", "asyncio"):
        port = free_port()
        toml = workdir / f"mirror-{loop_name}.toml"
        cache = workdir / f"cache-{loop_name}"
        toml.write_text(MIRROR_TOML.format(port=port, cache=cache, upstream=up_port))
        url = f"http://127.0.0.1:{port}"
        mirror_args = ["mirror", loop_name, str(toml)]
        started.append(_spawn(workdir, f"mirror-{loop_name}", mirror_args, url + "/v2/"))
        blob = f"/v2/{NAME}/blobs/{layer.digest}"
        tag, digest = f"/v2/{NAME}/manifests/v1", f"/v2/{NAME}/manifests/{image.digest}"
        for path in (blob, tag, digest, blob):  # the second blob GET is a hit: committed
            if http_status(url + path, timeout=120) != 200:
                raise RuntimeError(f"mirror on {loop_name} could not fill {path}")
        systems.append(System(f"mirror/{loop_name}", started[-1], url))
    return systems


def _blob_run(system: System, path: str, n: int, args: Any, script: Path) -> dict[str, Any]:
    out = _measure(
        system,
        lambda url: clients.run_wrk(
            url + path, connections=n, threads=2, seconds=args.seconds, script=script
        ),
    )
    gigabytes = out["bytes_per_s"] * args.seconds / 1e9
    return {
        "system": system.name,
        "clients": n,
        "gbps": out["bytes_per_s"] / 1e9,
        "cpu_s_per_gb": out["server_cpu_s"] / gigabytes if gigabytes else float("nan"),
        "errors": out["socket_errors"] + out["non_2xx"],
        "other_cpu": out["other_cpu"],
    }


def _manifest_run(
    system: System, request: str, image: Image, n: int, args: Any, workdir: Path, script: Path
) -> dict[str, Any]:
    if request == "HEAD tag":  # wrk cannot finish a HEAD: ab does those
        url = f"{system.url}/v2/{NAME}/manifests/v1"
        run = lambda _: clients.run_ab(url, connections=n, seconds=args.seconds, workdir=workdir)  # noqa: E731
    else:
        url = f"{system.url}/v2/{NAME}/manifests/{image.digest}"
        run = lambda _: clients.run_wrk(  # noqa: E731
            url, connections=n, threads=2, seconds=args.seconds, script=script
        )
    out = _measure(system, run)
    return {
        "system": f"{system.name} {request}",
        "clients": n,
        "rps": out["rps"],
        "p99_ms": out["p99_ms"],
        "errors": out["socket_errors"] + out["non_2xx"],
        "other_cpu": out["other_cpu"],
    }


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-loops-"))
    workdir.mkdir(parents=True, exist_ok=True)
    image = _image(workdir / "root", args.blob_mib)
    blob_path = f"/v2/{NAME}/blobs/{image.layers[0].digest}"
    started: list[Process] = []
    nginx = static(workdir / "nginx", free_port(), workdir / "root", [image], workers=1)
    try:
        systems = _start_systems(workdir, image, started)
        mirrors = systems[2:]
        nginx.start()
        systems.append(System("nginx static", None, nginx.url, lambda: nginx.pid))
        script = clients.wrk_script(workdir, "GET")
        blob_records, manifest_records = [], []
        for rep in range(args.reps):
            for n in (1, 50):
                # Rotate who goes first, so a burst of noise does not always hit one system.
                for system in systems[rep % len(systems) :] + systems[: rep % len(systems)]:
                    blob_records.append(
                        {**_blob_run(system, blob_path, n, args, script), "rep": rep}
                    )
                for system in mirrors[rep % 2 :] + mirrors[: rep % 2]:
                    for request in ("HEAD tag", "GET digest"):
                        run = _manifest_run(system, request, image, n, args, workdir, script)
                        manifest_records.append({**run, "rep": rep})
        _report(blob_records, manifest_records, args)
        results = {"blobs": blob_records, "manifests": manifest_records}
        (workdir / "loops.json").write_text(json.dumps(results, indent=1))
        print(f"raw figures: {workdir / 'loops.json'}")
        return 0
    finally:
        nginx.stop()
        for process in reversed(started):
            process.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _report(blobs: list[dict[str, Any]], manifests: list[dict[str, Any]], args: Any) -> None:
    print(f"\nwarm blob, {args.blob_mib} MiB, wrk {args.seconds:g} s x {args.reps} reps (medians)")
    # No latency column: with 128 MiB bodies a 5 s run completes a handful per client.
    print(f"{'system':24} {'clients':>7} {'GB/s':>6} {'+-%':>5} {'x nginx':>8} "
          f"{'x threads/uvloop':>16} {'cpu s/GB':>8} {'errors':>6}")  # fmt: skip
    gbps, cpu, errors = _rows(blobs, "gbps"), _rows(blobs, "cpu_s_per_gb"), _rows(blobs, "errors")
    for (system, n), values in gbps.items():
        print(f"{system:24} {n:>7} {median(values):>6.2f} {spread_pct(values):>5.0f} "
              f"{ratio(median(values), median(gbps['nginx static', n])):>8.2f} "
              f"{ratio(median(values), median(gbps['threads/uvloop', n])):>16.2f} "
              f"{median(cpu[system, n]):>8.2f} {sum(errors[system, n]):>6.0f}")  # fmt: skip
    print(f"other processes' CPU during the runs: {_noise(blobs)}")
    print(f"\ncached manifests, {args.seconds:g} s x {args.reps} reps (medians)")
    print(f"{'system':28} {'clients':>7} {'req/s':>8} {'+-%':>5} {'x uvloop':>8} {'p99 ms':>7}")
    rps, p99 = _rows(manifests, "rps"), _rows(manifests, "p99_ms")
    for (system, n), values in rps.items():
        uvloop = median(rps[system.replace("asyncio", "uvloop"), n])
        print(f"{system:28} {n:>7} {median(values):>8.0f} {spread_pct(values):>5.0f} "
              f"{ratio(median(values), uvloop):>8.2f} {median(p99[system, n]):>7.2f}")  # fmt: skip
    print(f"other processes' CPU during the runs: {_noise(manifests)}")


def _noise(records: list[dict[str, Any]]) -> str:
    values = sorted(r["other_cpu"] for r in records)
    return f"median {median(values):.2f} cores, max {values[-1]:.2f} (of {os.cpu_count()})"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loops", description=__doc__)
    parser.add_argument("--blob-mib", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 MiB, 2 s, one repetition")
    parser.add_argument("--keep", action="store_true", help="keep the workdir and its logs")
    parser.add_argument("--workdir")
    args = parser.parse_args(argv)
    if args.quick:
        args.blob_mib, args.seconds, args.reps = 32, 2.0, 1
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        started_at = time.monotonic()
        code = main(_parse(sys.argv[1:]))
        print(f"done in {time.monotonic() - started_at:.0f} s")
        sys.exit(code)
