"""Link emulator: TCP proxy with one-way latency, a per-connection bandwidth cap and counters.

It sits between a cache under test (the mirror or nginx proxy_cache) and the upstream
registry, so it models the long-haul link a regional mirror pulls across. Shaping is per TCP
connection, like the per-flow throughput limit of a real long fat pipe: a cache that opens 8
ranged streams gets 8x the bandwidth of one that opens one stream.

Run as its own process (`python -m bench.link ...`) so its CPU use does not disturb the
clients' timing; the harness reads and resets the counters over a small control endpoint:
    GET  /stats   -> JSON counters
    POST /reset   -> JSON counters before the reset, then zeroed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

READ_SIZE = 64 * 1024  # small enough that the pacing below is smooth at 25 MB/s (2.6 ms)
QUEUE_CHUNKS = 256  # bound on bytes held "in flight" per direction (256 x 64 KiB = 16 MiB)
IDLE_TIMEOUT = 120.0  # a connection silent this long in both directions is closed

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")


def path_kind(path: str) -> str:
    """Registry request kind from a path, for low-cardinality counters."""
    path = path.split("?", 1)[0]
    if path in ("/v2", "/v2/"):
        return "ping"
    for kind in ("blobs", "manifests", "tags", "referrers"):
        if f"/{kind}/" in path:
            return kind.rstrip("s")
    return "other"


@dataclass
class Counters:
    connections: int = 0
    active: int = 0
    bytes_up: int = 0  # cache -> upstream (requests)
    bytes_down: int = 0  # upstream -> cache (responses, headers included)
    requests: Counter[str] = field(default_factory=Counter)
    unparsed: int = 0  # connections whose request stream we stopped parsing
    since: float = field(default_factory=time.time)

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "active": self.active,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "unparsed": self.unparsed,
            "seconds": time.time() - self.since,
        }

    def reset(self) -> dict[str, Any]:
        before = self.snapshot()
        # `active` is not reset: connections open now stay open across the reset.
        self.connections = self.bytes_up = self.bytes_down = self.unparsed = 0
        self.requests = Counter()
        self.since = time.time()
        return before


class RequestCounter:
    """Incremental HTTP/1.1 request parser over the client->upstream byte stream.

    Counts "<METHOD> <kind>" (plus " range" for Range requests); skips Content-Length bodies.
    Pull traffic has no chunked request bodies; if one appears we stop parsing that
    connection and count it in `unparsed` rather than guess.
    """

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buffer = b""
        self.body_left = 0
        self.disabled = False

    def feed(self, data: bytes) -> None:
        if self.disabled:
            return
        if self.body_left:
            skip = min(self.body_left, len(data))
            self.body_left -= skip
            data = data[skip:]
        self.buffer += data
        for _ in range(10_000):  # bounded: each pass consumes one request head
            if self.body_left or b"\r\n\r\n" not in self.buffer:
                break
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self._count(head)
            if self.body_left:
                skip = min(self.body_left, len(self.buffer))
                self.body_left -= skip
                self.buffer = self.buffer[skip:]
        if len(self.buffer) > 64 * 1024:  # a head this large is not a registry pull request
            self._give_up()

    def _count(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        match = _REQUEST_LINE.match(lines[0].strip())
        if not match:
            self._give_up()
            return
        method, path = match.group(1).decode(), match.group(2).decode(errors="replace")
        ranged = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"range":
                ranged = True
            elif name == b"content-length":
                self.body_left = int(value.strip() or 0)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._give_up()
        key = f"{method} {path_kind(path)}" + (" range" if ranged else "")
        self.counters.requests[key] += 1

    def _give_up(self) -> None:
        self.disabled = True
        self.buffer = b""
        self.counters.unparsed += 1


class Link:
    """The proxy itself: accept, connect upstream after one emulated RTT, shape both ways."""

    def __init__(
        self,
        upstream: tuple[str, int],
        latency: float,
        rate: float,
        counters: Counters,
    ) -> None:
        self.upstream = upstream
        self.latency = latency  # one way, seconds
        self.rate = rate  # bytes/s per connection per direction; 0 = unlimited
        self.counters = counters

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        self.counters.active += 1
        try:
            # A TCP handshake across the link costs one round trip before any request goes out.
            await asyncio.sleep(2 * self.latency)
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), timeout=10
                )
            except (OSError, TimeoutError):
                return
            parser = RequestCounter(self.counters)

            def up(data: bytes) -> None:
                self.counters.bytes_up += len(data)
                parser.feed(data)

            def down(data: bytes) -> None:
                self.counters.bytes_down += len(data)

            pumps = [
                asyncio.create_task(self._pump(client_r, up_w, up)),
                asyncio.create_task(self._pump(up_r, client_w, down)),
            ]
            try:
                # Either side failing ends the connection; a clean EOF lets the other finish.
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                up_w.close()
        finally:
            self.counters.active -= 1
            client_w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_data: Any,
    ) -> None:
        """Read -> pace to `rate` -> hold `latency` -> write, with both stages overlapping.

        The reader stage stops reading while it is ahead of the rate, so TCP backpressure
        reaches the sender exactly as a slow link would; the writer stage delivers each
        chunk one latency after it "left", so latency does not reduce throughput.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)

        async def shape() -> None:
            free_at = loop.time()  # when the emulated wire finishes sending what we read
            for _ in range(1 << 40):  # bounded by EOF and the idle timeout in practice
                data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
                if not data:
                    break
                on_data(data)
                now = loop.time()
                if self.rate:
                    free_at = max(free_at, now) + len(data) / self.rate
                    # Token bucket with a one-chunk burst: sleep only when ahead of the rate.
                    ahead = free_at - now - READ_SIZE / self.rate
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                else:
                    free_at = now
                await queue.put((free_at + self.latency, data))
            await queue.put(None)

        async def deliver() -> None:
            for _ in range(1 << 40):
                item = await queue.get()
                if item is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                due, data = item
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(shape()), asyncio.create_task(deliver())]
        try:
            # A clean EOF lets the writer drain the queue; an error on either stage ends both.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result


async def _control(counters: Counters, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Minimal HTTP/1.0 control endpoint; one request per connection."""
    try:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        method, path = head.split(b" ", 2)[:2]
        if method == b"GET" and path == b"/stats":
            body, status = json.dumps(counters.snapshot()), "200 OK"
        elif method == b"POST" and path == b"/reset":
            body, status = json.dumps(counters.reset()), "200 OK"
        else:
            body, status = '{"error":"not found"}', "404 Not Found"
        data = body.encode()
        w.write(
            f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await w.drain()
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
        pass
    finally:
        w.close()


async def serve(args: argparse.Namespace) -> None:
    counters = Counters()
    host, _, port = args.upstream.rpartition(":")
    link = Link((host, int(port)), args.latency_ms / 1000, args.rate_mbps * 1e6, counters)
    lhost, _, lport = args.listen.rpartition(":")
    chost, _, cport = args.control.rpartition(":")
    proxy = await asyncio.start_server(link.handle, lhost, int(lport), backlog=1024)
    control = await asyncio.start_server(lambda r, w: _control(counters, r, w), chost, int(cport))
    async with proxy, control:
        # Bounded lifetime: a harness that died without stopping us cannot leave us forever.
        await asyncio.sleep(args.max_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.link", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--listen", required=True, help="host:port the cache connects to")
    parser.add_argument("--upstream", required=True, help="host:port of the upstream registry")
    parser.add_argument("--control", required=True, help="host:port of the counters endpoint")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="one-way latency")
    parser.add_argument(
        "--rate-mbps", type=float, default=25.0, help="MB/s (1e6 bytes) per connection; 0 = off"
    )
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:  # uvloop is a mirror dependency, but the emulator works without it
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        sys.exit(0)


class LinkControl:
    """Harness-side handle on a running emulator's counters."""

    def __init__(self, control: str, pid: int) -> None:
        self.base = f"http://{control}"
        self.pid = pid  # the emulator's process, for its CPU use

    def _call(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(
            self.base + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def reset(self) -> dict[str, Any]:
        return self._call("POST", "/reset")


if __name__ == "__main__":
    main()
