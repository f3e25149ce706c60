"""Load generators: concurrent verifying blob downloads (aiohttp) and keep-alive load (wrk).

The aiohttp clients are for cold runs, where per-client time to first byte and a sha256 check
of every body matter more than client efficiency (the link caps the rate anyway). wrk is for
warm and manifest runs, where a Python client would saturate a core before the server does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .procs import BenchError, require_binary

# containerd's Accept header for manifests: one comma-joined line ending in */*.
MANIFEST_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.oci.image.index.v1+json, */*"
)


@dataclass
class Download:
    status: int = 0
    size: int = 0
    digest_ok: bool = False
    ttfb: float = float("nan")  # request start -> first body byte
    seconds: float = float("nan")  # request start -> last byte
    error: str = ""


HASH_BATCH = 4 << 20  # hash in 4 MiB batches: few thread hand-offs, GIL released inside


def hash_batch(h: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        h.update(chunk)


async def _download(
    session: aiohttp.ClientSession,
    url: str,
    digest: str,
    start: asyncio.Event,
    hash_pool: ThreadPoolExecutor,
) -> Download:
    result = Download()
    loop = asyncio.get_running_loop()
    await start.wait()
    t0 = time.perf_counter()
    try:
        async with session.get(url) as resp:
            result.status = resp.status
            h = hashlib.sha256()
            batch: list[bytes] = []
            batched = 0
            # Bounded by the body length and the session's total timeout.
            async for chunk in resp.content.iter_any():
                if not result.size:
                    result.ttfb = time.perf_counter() - t0
                result.size += len(chunk)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= HASH_BATCH:
                    # sha256 costs ~1 s/GB: on the event loop it would make one core the
                    # bottleneck of every 50-client run, so it runs on a second thread.
                    await loop.run_in_executor(hash_pool, hash_batch, h, batch)
                    batch, batched = [], 0
            if batch:
                await loop.run_in_executor(hash_pool, hash_batch, h, batch)
            result.seconds = time.perf_counter() - t0
            result.digest_ok = resp.status == 200 and "sha256:" + h.hexdigest() == digest
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        result.seconds = time.perf_counter() - t0
        result.error = f"{type(exc).__name__}: {exc}"
    return result


@dataclass
class FanOut:
    wall: float  # first request sent -> last client done
    downloads: list[Download]
    client_cpu: float  # CPU seconds this harness process spent (receiving + hashing)


async def fan_out(url: str | list[str], clients: int, digest: str, deadline: float) -> FanOut:
    """`clients` concurrent GETs of one blob, each on its own connection, released together;
    spread round-robin over `url` when it is a list (replicas behind one Service). Redirects
    are followed (a presigned URL), as containerd and skopeo do."""
    urls = [url] if isinstance(url, str) else url
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    start = asyncio.Event()
    cpu0 = _cpu()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hash_pool:
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=deadline),
            auto_decompress=False,
            read_bufsize=1 << 20,  # fewer, larger reads: the client should not be the bottleneck
        ) as session:
            tasks = [
                asyncio.create_task(
                    _download(session, urls[i % len(urls)], digest, start, hash_pool)
                )
                for i in range(clients)
            ]
            await asyncio.sleep(0)  # let every task reach start.wait()
            t0 = time.perf_counter()
            start.set()
            downloads = await asyncio.gather(*tasks)
            wall = time.perf_counter() - t0
    return FanOut(wall, list(downloads), _cpu() - cpu0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request (warm-up, checks); returns status, headers and body."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600), auto_decompress=False
    ) as s:
        async with s.request(method, url, headers=headers or {}) as resp:
            body = await resp.read()
            return resp.status, dict(resp.headers), body


_WRK_SCRIPT = """\
wrk.method = "{method}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_script(workdir: Path, method: str) -> Path:
    path = workdir / f"wrk-{method.lower()}.lua"
    path.write_text(_WRK_SCRIPT.format(method=method))
    return path


def run_wrk(
    url: str,
    *,
    connections: int,
    threads: int,
    seconds: float,
    script: Path,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Run wrk for `seconds`; returns requests/s, bytes/s, latency percentiles and errors."""
    binary = require_binary("wrk", "wrk")
    argv = [
        binary,
        f"-c{connections}",
        f"-t{max(1, min(threads, connections))}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={int(timeout)}s",
        "-s",
        str(script),
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout + 30)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {argv}") from exc
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}"
        )
    raw = json.loads(line.split(" ", 1)[1])
    duration = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "rps": raw["requests"] / duration,
        "bytes_per_s": raw["bytes"] / duration,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "non_2xx": raw["status"],
        "socket_errors": errors,
        "raw": raw,
    }


def run_ab(
    url: str,
    *,
    connections: int,
    seconds: float,
    workdir: Path,
    method: str = "HEAD",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Run ApacheBench with keep-alive for `seconds` (used for HEAD: wrk cannot parse HEAD
    responses, it waits for the Content-Length body that never comes and completes nothing)."""
    binary = require_binary("ab", "apache2-utils")
    csv = workdir / f"ab-{connections}.csv"
    argv = [
        binary,
        "-k",
        "-q",
        "-r",
        "-c",
        str(connections),
        "-t",
        str(max(1, round(seconds))),
        "-n",
        "100000000",  # -t alone caps at 50000 requests
        "-s",
        str(int(timeout)),
        "-e",
        str(csv),
    ]
    if method == "HEAD":
        argv.append("-i")
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout + 30)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"ab did not finish: {argv}") from exc
    fields: dict[str, str] = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    if out.returncode != 0 or "Complete requests" not in fields:
        raise BenchError(f"ab failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    # -e: "Percentage served,Time in ms" for 0..100, in microsecond resolution.
    pct: dict[int, float] = {}
    for line in csv.read_text().splitlines()[1:]:
        p, _, ms = line.partition(",")
        pct[int(p)] = float(ms)
    complete = int(fields["Complete requests"])
    taken = float(fields["Time taken for tests"].split()[0])
    return {
        "rps": complete / taken if taken else 0.0,
        "p50_ms": pct.get(50, float("nan")),
        "p90_ms": pct.get(90, float("nan")),
        "p99_ms": pct.get(99, float("nan")),
        "max_ms": pct.get(100, float("nan")),
        "requests": complete,
        "non_2xx": int(fields.get("Non-2xx responses", "0")),
        "socket_errors": int(fields.get("Failed requests", "0").split()[0]),
        "keepalive": int(fields.get("Keep-Alive requests", "0")),
    }
