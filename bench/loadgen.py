"""Load generator for the `load` scenario, run as a process of its own (`python -m bench.loadgen`).

- `--clients` keep-alive connections, each sending the next request as soon as the previous
  answer is complete, cycling through the given requests (tag HEAD, digest GET, blob GET);
- meanwhile one new connection every 1/`--new-rate` s that sends one request: the time from
  connect() to the end of its answer is the figure new nodes feel during a scale-out;
- `--slow` clients that send a request head one byte every `--slow-gap` s: the server should
  cut them, and they must not slow anyone else down.

Plain asyncio protocols on uvloop with a minimal HTTP/1.1 response parser, so that one
process drives a thousand connections without being the bottleneck. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .report import percentile

TIMEOUT = 30.0  # an answer that takes longer counts as an error


@dataclass(frozen=True)
class Request:
    kind: str
    method: bytes
    raw: bytes


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    measuring: bool = False

    def record(self, kind: str, seconds: float) -> None:
        if self.measuring:
            self.latencies.setdefault(kind, []).append(seconds)

    def error(self, what: str) -> None:
        if not self.measuring:
            return
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(what)


class _Answer:
    """Incremental parse of one response: status, Content-Length, end of body."""

    __slots__ = ("buffer", "head_end", "needed", "status")

    def __init__(self) -> None:
        self.buffer = b""
        self.head_end = -1
        self.needed = 0
        self.status = 0

    def feed(self, data: bytes, head_only: bool) -> bool:
        """True once the whole response is in."""
        self.buffer += data
        if self.head_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head_end = end + 4
            head = self.buffer[:end]
            self.status = int(head[9:12])
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            self.needed = 0 if head_only else length
        return len(self.buffer) - self.head_end >= self.needed


class KeepAlive(asyncio.Protocol):
    """One busy client: a request, its answer, the next request, until told to stop."""

    def __init__(self, requests: list[Request], offset: int, tally: Tally) -> None:
        self._requests = requests
        self._next = offset
        self._tally = tally
        self._transport: asyncio.Transport | None = None
        self._answer = _Answer()
        self._current = requests[0]
        self._sent_at = 0.0
        self.stopping = False
        self.done = asyncio.get_running_loop().create_future()
        self.last_progress = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        self._current = self._requests[self._next % len(self._requests)]
        self._next += 1
        self._answer = _Answer()
        self._sent_at = time.monotonic()
        self._transport.write(self._current.raw)

    def data_received(self, data: bytes) -> None:
        try:
            complete = self._answer.feed(data, self._current.method == b"HEAD")
        except ValueError:
            self._tally.error(f"{self._current.kind}: unparsable answer {data[:80]!r}")
            self._finish()
            return
        if not complete:
            return
        now = time.monotonic()
        self.last_progress = now
        if self._answer.status != 200:
            self._tally.error(f"{self._current.kind}: status {self._answer.status}")
        else:
            self._tally.record(self._current.kind, now - self._sent_at)
        if self.stopping:
            self._finish()
        else:
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping:
            self._tally.error(f"{self._current.kind}: connection lost ({exc!r})")
        if not self.done.done():
            self.done.set_result(None)

    def stalled(self, now: float) -> bool:
        return not self.done.done() and now - self.last_progress > TIMEOUT

    def _finish(self) -> None:
        self.stopping = True
        if self._transport is not None:
            self._transport.close()


class OneShot(asyncio.Protocol):
    """A new connection: one request, timed from before connect() to the end of its answer."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._answer = _Answer()
        self.connected_at = 0.0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected_at = time.monotonic()
        self._transport = transport  # type: ignore[assignment]
        self._transport.write(self._request.raw)

    def data_received(self, data: bytes) -> None:
        try:
            complete = self._answer.feed(data, self._request.method == b"HEAD")
        except ValueError:
            complete = True
        if complete and not self.done.done():
            self.done.set_result(self._answer.status)
            assert self._transport is not None
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before an answer ({exc!r})"))


async def newcomer(host: str, port: int, request: Request, out: dict[str, list[Any]]) -> None:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        async with asyncio.timeout(TIMEOUT):
            _, proto = await loop.create_connection(lambda: OneShot(request), host, port)
            status = await proto.done
    except (OSError, TimeoutError) as exc:
        out["failures"].append(f"{type(exc).__name__}: {exc}")
        return
    if status != 200:
        out["failures"].append(f"status {status}")
        return
    out["connect"].append(proto.connected_at - started)
    out["first_response"].append(time.monotonic() - started)


async def slow_client(
    host: str, port: int, gap: float, until: float, out: dict[str, list[Any]]
) -> None:
    """A request head one byte at a time; notes when (if) the server hung up."""
    started = time.monotonic()
    head = b"GET /v2/ HTTP/1.1\r\nHost: bench\r\nUser-Agent: slow\r\n" + b"X-Pad: y\r\n" * 10000
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        out["failures"].append(f"slow connect: {exc}")
        return
    try:
        for byte in head:
            writer.write(bytes([byte]))
            try:
                got = await asyncio.wait_for(reader.read(65536), gap)
            except TimeoutError:
                got = None
            if got == b"" or reader.at_eof():
                out["cut_after"].append(time.monotonic() - started)
                return
            if time.monotonic() >= until:
                return
    except OSError:
        out["cut_after"].append(time.monotonic() - started)
    finally:
        writer.close()


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": max(values) * 1000 if values else math.nan,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, _, port_text = args.target.rpartition(":")
    port = int(port_text)
    requests = []
    for spec in args.request:
        kind, method, path, *headers = spec.split("|")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {args.target}", *headers, "", ""]
        requests.append(Request(kind, method.encode(), "\r\n".join(lines).encode()))
    tally = Tally()
    clients: list[KeepAlive] = []
    ramp_started = time.monotonic()
    for i in range(args.clients):  # in batches, so the ramp itself is no connect storm
        try:
            _, proto = await loop.create_connection(
                lambda i=i: KeepAlive(requests, i, tally), host, port
            )
        except OSError as exc:
            tally.errors.append(f"keep-alive connect {i}: {exc}")
            tally.error_count += 1
            continue
        clients.append(proto)
        if i % 50 == 49:
            await asyncio.sleep(0.02)
    ramp = time.monotonic() - ramp_started
    await asyncio.sleep(args.settle)
    tally.measuring = True
    measure_started = time.monotonic()
    until = measure_started + args.seconds
    newcomers: dict[str, list[Any]] = {"connect": [], "first_response": [], "failures": []}
    slow: dict[str, list[Any]] = {"cut_after": [], "failures": []}
    slow_tasks = [
        asyncio.create_task(slow_client(host, port, args.slow_gap, until, slow))
        for _ in range(args.slow)
    ]
    new_tasks = []
    count_before = sum(len(v) for v in tally.latencies.values())
    next_at = measure_started
    for _ in range(100_000):
        now = time.monotonic()
        if now >= until:
            break
        if now >= next_at:
            request = requests[len(new_tasks) % len(requests)]
            new_tasks.append(asyncio.create_task(newcomer(host, port, request, newcomers)))
            next_at += 1.0 / args.new_rate
        for client in clients:
            if client.stalled(now):
                tally.error("keep-alive: no answer for 30 s")
                client.last_progress = now
        await asyncio.sleep(min(0.01, max(0.0, next_at - time.monotonic())))
    measured = time.monotonic() - measure_started
    answered = sum(len(v) for v in tally.latencies.values()) - count_before
    tally.measuring = False
    for client in clients:
        client.stopping = True
    for pending in ([c.done for c in clients], new_tasks):
        if pending:
            await asyncio.wait(pending, timeout=TIMEOUT)
    for task in slow_tasks:
        task.cancel()
    await asyncio.gather(*slow_tasks, return_exceptions=True)
    everything = [s for v in tally.latencies.values() for s in v]
    return {
        "clients": len(clients),
        "ramp_s": ramp,
        "seconds": measured,
        "answers": answered,
        "rps": len(everything) / measured if measured else math.nan,
        "errors": tally.error_count + len(newcomers["failures"]),
        "error_samples": tally.errors + newcomers["failures"][:10],
        "latency": _ms(everything),
        "by_kind": {k: _ms(v) for k, v in tally.latencies.items()},
        "new_connections": {
            "started": len(new_tasks),
            "failed": len(newcomers["failures"]),
            "first_response": _ms(newcomers["first_response"]),
            "connect": _ms(newcomers["connect"]),
        },
        "slow": {
            "started": args.slow,
            "cut": len(slow["cut_after"]),
            "cut_after_median_s": percentile(slow["cut_after"], 50),
            "failures": slow["failures"][:5],
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--target", required=True, help="host:port")
    p.add_argument(
        "--request", action="append", required=True, help="kind|METHOD|path[|Header: value...]"
    )
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--settle", type=float, default=2.0, help="busy seconds before measuring")
    p.add_argument("--new-rate", type=float, default=20.0, help="new connections per second")
    p.add_argument("--slow", type=int, default=50, help="slow-header clients")
    p.add_argument("--slow-gap", type=float, default=1.0, help="seconds between their bytes")
    args = p.parse_args(argv)
    import uvloop

    result = uvloop.run(run(args))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
