"""Link emulator: TCP proxy with one-way latency, a per-connection bandwidth cap and counters.

It sits between a cache under test (the mirror or nginx proxy_cache) and the upstream
registry, so it models the long-haul link a regional mirror pulls across. Shaping is per TCP
connection, like the per-flow throughput limit of a real long fat pipe: a cache that opens 8
ranged streams gets 8x the bandwidth of one that opens one stream.

Run as its own process (`python -m bench.link ...`) so its CPU use does not disturb the
clients' timing; the harness reads and resets the counters over a small control endpoint:
    GET  /stats   -> JSON counters
    POST /reset   -> JSON counters before the reset, then zeroed
    POST /limit?count=K&window=S -> from now on, at most K manifest GETs per S seconds
                    are forwarded; the rest get 429 + Retry-After, as Docker Hub answers
                    past its pull limit (HEADs stay free); count=0 lifts the limit

With `--shared-rate` the rate is one budget for all connections together (a node's NIC)
instead of one per connection (a long-haul flow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .pacing import TokenBucket

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
class ManifestLimit:
    """A Docker-Hub-like pull limit: `count` manifest GETs per fixed window (0 = none).

    The window starts at the first GET counted against it, like a quota that resets
    `window` seconds later; past the count, requests are refused until then.
    """

    count: int = 0
    window: float = 3600.0
    used: int = 0
    started: float | None = None

    def admit(self, now: float) -> float | None:
        """None when the GET may go upstream; otherwise the Retry-After in seconds."""
        if not self.count:
            return None
        if self.started is None or now - self.started >= self.window:
            self.started, self.used = now, 0
        if self.used < self.count:
            self.used += 1
            return None
        return max(1.0, self.window - (now - self.started))


def too_many_requests(retry_after: float, limit: ManifestLimit) -> bytes:
    """The 429 a registry sends past its pull limit, in the OCI error envelope."""
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "TOOMANYREQUESTS",
                    "message": "You have reached your pull rate limit.",
                    "detail": None,
                }
            ]
        }
    ).encode()
    window = int(limit.window)
    return (
        "HTTP/1.1 429 Too Many Requests\r\n"
        "Content-Type: application/json\r\n"
        f"Retry-After: {int(retry_after)}\r\n"
        f"RateLimit-Limit: {limit.count};w={window}\r\n"
        f"RateLimit-Remaining: 0;w={window}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class Counters:
    connections: int = 0
    active: int = 0
    bytes_up: int = 0  # cache -> upstream (requests)
    bytes_down: int = 0  # upstream -> cache (responses, headers included)
    requests: Counter[str] = field(default_factory=Counter)
    unparsed: int = 0  # connections whose request stream we stopped parsing
    refused: int = 0  # manifest GETs answered 429 by the limit
    since: float = field(default_factory=time.time)
    limit: ManifestLimit = field(default_factory=ManifestLimit)

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "active": self.active,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "unparsed": self.unparsed,
            "refused": self.refused,
            "limit": self.limit.count,
            "seconds": time.time() - self.since,
        }

    def reset(self) -> dict[str, Any]:
        before = self.snapshot()
        # `active` is not reset: connections open now stay open across the reset.
        self.connections = self.bytes_up = self.bytes_down = self.unparsed = self.refused = 0
        self.requests = Counter()
        self.limit = ManifestLimit(self.limit.count, self.limit.window)  # a fresh window
        self.since = time.time()
        return before


class RequestGate:
    """Incremental HTTP/1.1 request parser over the client->upstream byte stream.

    Counts "<METHOD> <kind>" (plus " range" for Range requests) and passes each request on
    once its head is complete, unless the manifest limit refuses it: then the head is
    dropped and a 429 is returned for the client instead. Content-Length bodies pass
    through. Pull traffic has no chunked request bodies; if one appears we stop parsing
    that connection (everything passes through) and count it in `unparsed`.
    Clients of a registry do not pipeline, so a refused request's reply cannot overtake
    the response to an earlier one.
    """

    def __init__(self, counters: Counters, clock: Callable[[], float] = time.monotonic) -> None:
        self.counters = counters
        self.clock = clock
        self.buffer = b""
        self.body_left = 0
        self.disabled = False

    def feed(self, data: bytes) -> tuple[bytes, list[bytes]]:
        """Bytes to forward upstream now, and replies to send the client instead."""
        if self.disabled:
            return data, []
        out, replies = bytearray(), []
        if self.body_left:
            out += self._body(data)
            data = data[len(out) :]
        self.buffer += data
        for _ in range(10_000):  # bounded: each pass consumes one request head
            if self.disabled or self.body_left or b"\r\n\r\n" not in self.buffer:
                break
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            reply = self._count(head)
            if reply is None:
                out += head + b"\r\n\r\n"
            else:
                replies.append(reply)
            if self.body_left:
                body = self._body(self.buffer)
                out += body
                self.buffer = self.buffer[len(body) :]
        if len(self.buffer) > 64 * 1024:  # a head this large is not a registry pull request
            self._give_up()
        if self.disabled:
            out += self.buffer
            self.buffer = b""
        return bytes(out), replies

    def _body(self, data: bytes) -> bytes:
        part = data[: self.body_left]
        self.body_left -= len(part)
        return part

    def _count(self, head: bytes) -> bytes | None:
        lines = head.split(b"\r\n")
        match = _REQUEST_LINE.match(lines[0].strip())
        if not match:
            self._give_up()
            return None
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
        kind = path_kind(path)
        key = f"{method} {kind}" + (" range" if ranged else "")
        self.counters.requests[key] += 1
        if method == "GET" and kind == "manifest" and not self.body_left:
            retry_after = self.counters.limit.admit(self.clock())
            if retry_after is not None:
                self.counters.refused += 1
                return too_many_requests(retry_after, self.counters.limit)
        return None

    def _give_up(self) -> None:
        self.disabled = True
        self.counters.unparsed += 1


class Link:
    """The proxy itself: accept, connect upstream after one emulated RTT, shape both ways."""

    def __init__(
        self,
        upstream: tuple[str, int],
        latency: float,
        rate: float,
        counters: Counters,
        *,
        shared_rate: bool = False,
    ) -> None:
        self.upstream = upstream
        self.latency = latency  # one way, seconds
        self.rate = rate  # bytes/s per connection per direction; 0 = unlimited
        self.counters = counters
        # One budget per direction for every connection together (a NIC), or None: one each.
        self.shared = (
            (TokenBucket(rate, READ_SIZE), TokenBucket(rate, READ_SIZE)) if shared_rate else None
        )

    def _buckets(self) -> tuple[TokenBucket, TokenBucket]:
        if self.shared is not None:
            return self.shared
        return TokenBucket(self.rate, READ_SIZE), TokenBucket(self.rate, READ_SIZE)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        self.counters.active += 1
        loop = asyncio.get_running_loop()
        try:
            # A TCP handshake across the link costs one round trip before any request goes out.
            await asyncio.sleep(2 * self.latency)
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), timeout=10
                )
            except (OSError, TimeoutError):
                return
            gate = RequestGate(self.counters)

            def up(data: bytes) -> bytes:
                self.counters.bytes_up += len(data)
                forward, replies = gate.feed(data)
                for reply in replies:
                    # The refusal comes from the far side: one round trip after the request.
                    loop.call_later(2 * self.latency, _write_unless_closed, client_w, reply)
                return forward

            def down(data: bytes) -> bytes:
                self.counters.bytes_down += len(data)
                return data

            up_bucket, down_bucket = self._buckets()
            pumps = [
                asyncio.create_task(self._pump(client_r, up_w, up, up_bucket)),
                asyncio.create_task(self._pump(up_r, client_w, down, down_bucket)),
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
        on_data: Callable[[bytes], bytes],
        bucket: TokenBucket,
    ) -> None:
        """Read -> pace to the rate -> hold `latency` -> write, with both stages overlapping.

        The reader stage stops reading while it is ahead of the rate, so TCP backpressure
        reaches the sender exactly as a slow link would; the writer stage delivers each
        chunk one latency after it "left", so latency does not reduce throughput.
        `on_data` sees every chunk read and returns the bytes to pass on.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)

        async def shape() -> None:
            for _ in range(1 << 40):  # bounded by EOF and the idle timeout in practice
                data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
                if not data:
                    break
                data = on_data(data)
                # Token bucket with a one-chunk burst: sleep only when ahead of the rate.
                wait = bucket.take(loop.time(), len(data))
                due = bucket.free_at + self.latency  # read now: a shared bucket moves on
                if wait > 0:
                    await asyncio.sleep(wait)
                if data:
                    await queue.put((due, data))
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


def _write_unless_closed(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


async def _control(counters: Counters, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Minimal HTTP/1.0 control endpoint; one request per connection."""
    try:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        method, target = head.split(b" ", 2)[:2]
        path, _, query = target.decode().partition("?")
        if method == b"GET" and path == "/stats":
            body, status = json.dumps(counters.snapshot()), "200 OK"
        elif method == b"POST" and path == "/reset":
            body, status = json.dumps(counters.reset()), "200 OK"
        elif method == b"POST" and path == "/limit":
            params = dict(urllib.parse.parse_qsl(query))
            counters.limit = ManifestLimit(
                int(params.get("count", "0")), float(params.get("window", "3600"))
            )
            body, status = json.dumps({"limit": counters.limit.count}), "200 OK"
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
    link = Link(
        (host, int(port)),
        args.latency_ms / 1000,
        args.rate_mbps * 1e6,
        counters,
        shared_rate=args.shared_rate,
    )
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
    parser.add_argument(
        "--shared-rate",
        action="store_true",
        help="one rate for all connections together (a NIC) instead of one per connection",
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

    def limit(self, count: int, window: float = 3600.0) -> dict[str, Any]:
        """Refuse manifest GETs past `count` per `window` seconds (0 lifts the limit)."""
        return self._call("POST", f"/limit?count={count}&window={window:g}")


if __name__ == "__main__":
    main()
