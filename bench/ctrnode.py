"""Real containerd nodes in a burst: `ctr images pull` processes beside the simulated nodes.

One containerd daemon per round on a fresh root (content isolated per namespace, so each
node downloads everything), one namespace per node. Each node reaches its target through
its own NIC shaper (`python -m bench.link --shared-rate`, no latency), so a real node is
paced like a simulated one. `ctr` 1.6 resolves and fetches on the client side with the same
resolver the CRI plugin uses; `--max-concurrent-downloads 3` is CRI's default. The pull
includes unpacking (native snapshotter: a copy of every layer), which the simulated nodes
skip, so a real node is expected to be a little slower.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .node import NodeResult
from .procs import Process, free_port, http_status, require_binary

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""


def hosts_toml(target: str, mirror_like: bool, dead: str) -> str:
    """containerd's hosts.toml for a node: the target as a mirror host (with a fallback that
    refuses connections, so a pull passes only through the target) or as the server."""
    if not mirror_like:
        return f'server = "{target}"\n'
    return f'server = "http://{dead}"\n\n[host."{target}"]\n  capabilities = ["pull", "resolve"]\n'


def failure_reason(output: str) -> str:
    """Failure class of a ctr pull from what it printed."""
    text = output.lower()
    if "429" in text or "too many requests" in text or "toomanyrequests" in text:
        return "429"
    if "digest" in text and ("mismatch" in text or "unexpected commit" in text):
        return "digest"
    for code in ("500", "502", "503", "504"):
        if f"status {code}" in text or f": {code} " in text:
            return "5xx"
    if "unexpected eof" in text or "short read" in text:
        return "length"
    return "error"


class CtrNodes:
    """`count` real nodes for one round; start() before the burst, stop() after it."""

    def __init__(self, workdir: Path, count: int, nic_mbps: float, registry: str) -> None:
        self.workdir = workdir
        self.count = count
        self.nic_mbps = nic_mbps
        self.registry = registry  # the image reference's host, e.g. 127.0.0.1:40123
        self.ctr = require_binary("ctr", "containerd") if count else ""
        self.containerd = require_binary("containerd", "containerd") if count else ""
        self.sock = workdir / "containerd.sock"
        self.daemon: Process | None = None
        self.shapers: list[Process] = []
        self.hosts_dirs: list[Path] = []
        # Held bound, never listening: a refused fallback that nothing else can take.
        self.dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.dead.bind(("127.0.0.1", 0))
        self.dead_addr = f"127.0.0.1:{self.dead.getsockname()[1]}"

    def start(self, targets: list[str], mirror_like: bool) -> None:
        """Daemon on a fresh root, one shaper per node in front of targets[i % len]."""
        if not self.count:
            return
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        config = self.workdir / "config.toml"
        config.write_text(
            CONFIG.format(root=self.workdir / "root", state=self.workdir / "state", sock=self.sock)
        )
        self.daemon = Process(
            "containerd", [self.containerd, "--config", str(config)], self.workdir / "ctd.log"
        ).start()
        self.hosts_dirs = []
        for i in range(self.count):
            upstream = targets[i % len(targets)].removeprefix("http://")
            port, control = free_port(), free_port()
            shaper = Process(
                f"nic-shaper-{i}",
                [
                    sys.executable,
                    "-m",
                    "bench.link",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--upstream",
                    upstream,
                    "--control",
                    f"127.0.0.1:{control}",
                    "--latency-ms",
                    "0",
                    "--rate-mbps",
                    str(self.nic_mbps),
                    "--shared-rate",
                    "--max-seconds",
                    "3600",
                ],
                self.workdir / f"shaper{i}.log",
                cwd=Path(__file__).resolve().parent.parent,
            ).start()
            self.shapers.append(shaper)
            shaper.wait_ready(lambda c=control: http_status(f"http://127.0.0.1:{c}/stats") == 200)
            hosts = self.workdir / f"hosts{i}" / self.registry
            hosts.mkdir(parents=True)
            (hosts / "hosts.toml").write_text(
                hosts_toml(f"http://127.0.0.1:{port}", mirror_like, self.dead_addr)
            )
            self.hosts_dirs.append(hosts.parent)
        self.daemon.wait_ready(self._answers)

    def _answers(self) -> bool:
        out = subprocess.run(
            [self.ctr, "-a", str(self.sock), "version"], capture_output=True, timeout=5
        )
        return out.returncode == 0

    async def pull(self, i: int, ref: str, limit_s: float) -> NodeResult:
        """One real node's pull of `ref` (`<registry>/<name>:<tag>`); never raises."""
        result = NodeResult(kind="ctr")
        argv = [
            self.ctr,
            "-a",
            str(self.sock),
            "-n",
            f"node{i}",
            "images",
            "pull",
            "--plain-http",
            "--hosts-dir",
            str(self.hosts_dirs[i]),
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            "--max-concurrent-downloads",
            "3",
            ref,
        ]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            result.seconds = time.perf_counter() - t0
            result.reason, result.detail = "error", f"ctr pull did not finish in {limit_s:g}s"
            return result
        result.seconds = time.perf_counter() - t0
        text = out.decode(errors="replace")
        result.ok = proc.returncode == 0
        if not result.ok:
            result.reason, result.detail = failure_reason(text), text.strip()[-300:]
        return result

    def stop(self) -> None:
        for shaper in self.shapers:
            shaper.stop()
        self.shapers = []
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def close(self) -> None:
        self.stop()
        self.dead.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
