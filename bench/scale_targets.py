"""What the scale-out nodes pull from: the mirror (one or more replicas), its peers, the origin.

Every target starts cold for a round (`fresh`), names the URLs its nodes are spread over,
the processes whose CPU and memory count as its cost, and how it is warmed. The mirror is
built from a list of configs, one per replica, so cluster shapes are the same class:

    mirror_fleet(name, [spec, spec, spec])  # three replicas with [cluster] peers = [...]

SEAM (issue 13): "mirror x3" and "mirror x3 + S3" are in the target list already; they are
skipped, with a printed note, while the snapshot's config loader refuses `[cluster]` or
`[s3]`, and light up once it accepts them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import peers
from .node import NodeResult
from .peers import Nginx
from .procs import Process, free_port, http_status, peak_rss_bytes
from .target import Mirror
from .upstream import Registry

CACHE, ORIGIN, FLOOR = "cache", "origin", "floor"

PullOnce = Callable[[str], Awaitable[NodeResult]]  # one node's pull from a base URL


@dataclass
class ScaleTarget:
    """One system under test; subclasses say how it starts, stops and is warmed."""

    name: str
    role: str = CACHE  # cache | origin | floor
    mirror_like: bool = True  # containerd sends ?ns= to a mirror host, not to the origin

    def fresh(self) -> None:
        """(Re)start on an empty cache."""

    def stop(self) -> None:
        """Stop whatever fresh() started."""

    def urls(self) -> list[str]:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []

    def peak_rss(self) -> int:
        """Largest VmHWM of one server process (a replica), 0 when not ours to measure."""
        return max((peak_rss_bytes(p) for p in self.pids()), default=0)

    async def warm(self, ref: str, pull_once: PullOnce) -> dict[str, Any]:
        """Fill the cache before a warm burst; by default one node pulls the image."""
        result = await pull_once(self.urls()[0])
        return {"how": "one node pull", "ok": result.ok, "seconds": result.seconds}

    def log_tail(self) -> str:
        return ""


@dataclass
class MirrorSpec:
    """One replica's config beyond the common part: more [server] keys, more sections."""

    server_extra: str = ""
    extra: str = ""


@dataclass
class MirrorFleet(ScaleTarget):
    """The mirror as one or more replica processes, each from its own config."""

    workdir: Path = Path()
    source: Path = Path()
    link: str = ""
    registry: str = ""
    specs: list[MirrorSpec] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    replicas: list[Mirror] = field(default_factory=list)
    bucket: MotoS3 | None = None  # the shared level, emptied with the replicas' disks

    def __post_init__(self) -> None:
        if not self.ports:
            self.ports = [free_port() for _ in self.specs]
        self.replicas = [
            Mirror(
                self.workdir / f"replica{i}",
                port,
                self.link,
                self.source,
                registry=self.registry,
                server_extra=spec.server_extra,
                extra=spec.extra,
                env=self.env or None,
            )
            for i, (port, spec) in enumerate(zip(self.ports, self.specs, strict=True))
        ]

    def fresh(self) -> None:
        for replica in self.replicas:
            replica.stop()
            shutil.rmtree(replica.cache, ignore_errors=True)
        if self.bucket is not None:
            self.bucket.empty()
        for replica in self.replicas:
            replica.start()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def pids(self) -> list[int]:
        return [r.pid for r in self.replicas if r.process is not None]

    async def warm(self, ref: str, pull_once: PullOnce) -> dict[str, Any]:
        """Warm `ref` through the first replica's warm API; wait for the job (bounded)."""
        admin = self.replicas[0].admin_url
        job = await asyncio.to_thread(
            _post_json, f"{admin}/admin/warm", {"images": [ref], "platforms": ["linux/amd64"]}
        )
        status: dict[str, Any] = {}
        for _ in range(6000):  # bounded: 10 min at 0.1 s
            status = await asyncio.to_thread(_get_json, admin + job["status_url"])
            if status.get("state") in ("done", "failed"):
                break
            await asyncio.sleep(0.1)
        return {
            "how": "warm API",
            "ok": status.get("state") == "done",
            "state": status.get("state"),
            "bytes": status.get("bytes_done"),
        }

    def log_tail(self) -> str:
        return "\n".join(r.log_tail(2000) for r in self.replicas)


def _post_json(url: str, doc: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url,
        data=json.dumps(doc).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def cluster_specs(
    ports: list[int], s3: str = "", admin_ports: list[int] | None = None
) -> list[MirrorSpec]:
    """Configs for replicas on `ports` that know each other as peers (and share `s3`, a
    ready [s3] section); each replica's admin API gets its own port when given."""
    peers_list = ", ".join(f'"http://127.0.0.1:{p}"' for p in ports)
    specs = []
    for i, port in enumerate(ports):
        server = f'admin_listen = "127.0.0.1:{admin_ports[i]}"\n' if admin_ports else ""
        cluster = f'[cluster]\npeers = [{peers_list}]\nself = "http://127.0.0.1:{port}"\n'
        specs.append(MirrorSpec(server_extra=server, extra=cluster + s3))
    return specs


def s3_section(endpoint: str, bucket: str, region: str = "us-east-1") -> str:
    return f'[s3]\nbucket = "{bucket}"\nregion = "{region}"\nendpoint_url = "{endpoint}"\n'


@dataclass
class NginxCache(ScaleTarget):
    nginx: Nginx | None = None

    def fresh(self) -> None:
        assert self.nginx is not None
        peers.fresh_proxy_cache(self.nginx)

    def stop(self) -> None:
        assert self.nginx is not None
        self.nginx.stop()

    def urls(self) -> list[str]:
        assert self.nginx is not None
        return [self.nginx.url]

    def pids(self) -> list[int]:
        return [self.nginx.pid] if self.nginx and self.nginx.process else []


@dataclass
class DistributionProxy(ScaleTarget):
    """CNCF Distribution with a `proxy:` section: a pull-through cache of the origin."""

    registry_proc: Registry | None = None

    def fresh(self) -> None:
        assert self.registry_proc is not None
        self.registry_proc.fresh()

    def stop(self) -> None:
        assert self.registry_proc is not None
        self.registry_proc.stop()

    def urls(self) -> list[str]:
        assert self.registry_proc is not None
        return [self.registry_proc.url]

    def pids(self) -> list[int]:
        proc = self.registry_proc
        return [proc.pid] if proc is not None and proc.process.running() else []


@dataclass
class Origin(ScaleTarget):
    """No cache: nodes pull straight from the origin registry across the emulated link."""

    url: str = ""
    registry_pid: int = 0

    def urls(self) -> list[str]:
        return [self.url]

    def pids(self) -> list[int]:
        return [self.registry_pid] if self.registry_pid else []

    def peak_rss(self) -> int:
        return 0  # the origin's memory is not a cost the cluster pays


@dataclass
class Floor(ScaleTarget):
    """nginx serving the same layers from local disk: what this box can do at all."""

    nginx: Nginx | None = None

    def fresh(self) -> None:
        assert self.nginx is not None
        if self.nginx.process is None:
            self.nginx.start()

    def stop(self) -> None:
        pass  # kept running between rounds: nothing in it is a cache

    def urls(self) -> list[str]:
        assert self.nginx is not None
        return [self.nginx.url]

    def pids(self) -> list[int]:
        return [self.nginx.pid] if self.nginx and self.nginx.process else []


class MotoS3:
    """moto's server as the S3 of the replicas' shared level, with one bucket."""

    def __init__(self, workdir: Path, bucket: str = "mirror-bench") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        binary = shutil.which("moto_server") or ""
        argv = [binary, "-H", "127.0.0.1", "-p", str(self.port)] if binary else []
        if not argv:
            argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = Process("moto", argv, workdir / "logs" / "moto.log")

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(lambda: http_status(self.url + "/") is not None, timeout=30)
        req = urllib.request.Request(f"{self.url}/{self.bucket}", method="PUT")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def empty(self) -> None:
        """Forget every object: a round that starts cold starts with an empty bucket too."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass
        req = urllib.request.Request(f"{self.url}/{self.bucket}", method="PUT")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        self.process.stop()
