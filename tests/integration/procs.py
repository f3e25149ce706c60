"""Child processes for the integration harness: free ports, readiness polling, clean teardown."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from ctypes import CDLL
from dataclasses import dataclass
from pathlib import Path


class HarnessError(RuntimeError):
    """The harness itself could not do its job (a binary is missing, a process did not start)."""


def require_binary(*candidates: str) -> str:
    """The first candidate found on PATH; fail loudly because these tests must never skip."""
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise HarnessError(
        f"none of {candidates} is installed; the integration tests need the Debian packages "
        "docker-registry, skopeo and containerd"
    )


def free_port() -> int:
    """A port nobody listens on right now (the kernel picks it, so parallel runs do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DeadPort:
    """A port held bound but never listening: connecting to it is refused at once, and no
    other process can start listening there during the session (unlike a port that merely
    happened to be free). Client configs use it as the fallback that must never work."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll `predicate` until it holds; a readiness check, not a sleep standing in for one."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def http_request(
    method: str,
    url_host: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Response:
    """One plain-HTTP request; headers are a list so a name can repeat (like skopeo's Accept)."""
    host, _, port = url_host.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        # HEAD responses have no body even when Content-Length says otherwise.
        data = b"" if method == "HEAD" else resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


def answers(host_port: str, path: str, status: int = 200) -> bool:
    """True when an HTTP server on host_port answers `path` with `status`."""
    try:
        return http_request("GET", host_port, path, timeout=1.0).status == status
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when pytest dies, even by kill -9."""
    CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Process:
    """A child process whose stdout and stderr go to one log file, killed with its group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append so that a restarted process keeps the earlier log for post-mortems.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                # Own process group: teardown can signal every descendant, nothing leaks.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        """Poll readiness, but give up at once (with the log) if the process already died."""

        def ready() -> bool:
            if not self.running():
                raise HarnessError(
                    f"{self.name} exited with {self.proc and self.proc.returncode} before it "
                    f"was ready; log:\n{self.log_tail()}"
                )
            return predicate()

        try:
            wait_until(ready, timeout=timeout, what=f"{self.name} to become ready")
        except HarnessError:
            self.stop()
            raise

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the group, wait, escalate to SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)
        # Reap anything the child left in its group (a SIGKILLed parent cannot clean up).
        self._signal_group(signal.SIGKILL)
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, max_bytes: int = 20_000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-max_bytes:].decode(errors="replace")


def run(
    argv: Sequence[str], *, timeout: float = 60.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client command to completion; raise with its output if it fails."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise CommandFailed(list(argv), result)
    return result


class CommandFailed(AssertionError):
    """A client command failed; an AssertionError so pytest shows it as a test failure."""

    def __init__(self, argv: list[str], result: subprocess.CompletedProcess[str]) -> None:
        self.argv = argv
        self.result = result
        super().__init__(
            f"command failed with exit code {result.returncode}: {' '.join(argv)}\n"
            f"--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-5000:]}"
        )
