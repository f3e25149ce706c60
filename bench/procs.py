"""Child processes for the benchmark: ports, bounded readiness polls, teardown, /proc probes."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class BenchError(RuntimeError):
    """The harness could not do its job (a binary is missing, a process did not start)."""


def require_binary(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise BenchError(f"{name} not found; install it with: apt-get install -y {package}")
    return found


def free_port() -> int:
    """A port nobody listens on right now; the kernel picks it so parallel runs do not clash."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, method: str = "GET", timeout: float = 1.0) -> int | None:
    """Status of one request, or None when nothing answers (used only for readiness probes)."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method=method), timeout=timeout
        ) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Poll until `predicate` holds (bounded by time and count); returns the seconds it took."""
    start = time.monotonic()
    interval = 0.01
    for _ in range(100_000):  # a count bound as well as the deadline below
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)
    raise BenchError(f"timed out after {timeout}s waiting for {what}")


class Process:
    """A child in its own process group with stdout+stderr in one log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append: a restarted process keeps the earlier log for post-mortems.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                # Own process group, so teardown reaches every descendant and nothing leaks.
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, predicate: Callable[[], bool], timeout: float = 20.0) -> float:
        """Poll readiness; fail at once, with the log tail, if the process died meanwhile."""

        def ready() -> bool:
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise BenchError(
                    f"{self.name} exited with {code} before it was ready; log tail:\n"
                    f"{self.log_tail()}"
                )
            return predicate()

        try:
            return wait_until(ready, timeout=timeout, what=f"{self.name} to become ready")
        except BenchError:
            self.stop()
            raise

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal our own group, wait (bounded), escalate to SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)
        # Reap anything left in the group (a SIGKILLed parent cannot clean up after itself).
        self._signal_group(signal.SIGKILL)
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-max_bytes:].decode(errors="replace")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (the mirror may fork workers)."""
    result, todo = [], [pid]
    for _ in range(10_000):
        if not todo:
            break
        current = todo.pop()
        result.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
    return result


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Current resident set of the process tree."""
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid)) * 1024


def peak_rss_bytes(pid: int) -> int:
    """Sum of VmHWM (the kernel's own peak RSS) over the process tree."""
    return sum(_status_kib(p, "VmHWM") for p in process_tree(pid)) * 1024


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process tree so far (children that exited are not included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            # The comm field may contain spaces; fields after the closing paren are stable.
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores, from /proc/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def harness_cpu() -> float:
    """CPU seconds of this process plus its waited-for children (wrk, ab)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class NoiseMeter:
    """CPU that processes outside the benchmark used during one round, and VM steal time.

    The machine is shared: a round during which someone else's job ran is not comparable
    with one during which nothing did. Recording this per round lets a reader see why two
    repetitions differ instead of guessing.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = machine_cpu()
        self.own0 = harness_cpu() + sum(cpu_seconds(p) for p in pids)

    def stop(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        busy, steal = machine_cpu()
        own = harness_cpu() + sum(cpu_seconds(p) for p in self.pids) - self.own0
        other = max(0.0, busy - self.busy0 - own)
        return {
            "other_cpu_per_s": other / elapsed,  # cores' worth of foreign work, 0..ncpu
            "steal_pct": 100 * (steal - self.steal0) / elapsed / (os.cpu_count() or 1),
        }
