"""Client connections as a bounded resource: the cap, the request-head deadline, real resets.

Every descriptor a client holds is one the mirror cannot use for serving (a cached blob's file,
an upstream socket). So the number of open client connections is capped below the descriptor
limit, with a reserve kept for serving; a connection past the cap gets a 503 and is closed at
once. A connection must send a complete request head within `server.header_timeout` of its
first byte (or of being accepted): one that sends a byte now and then holds its descriptor no
longer than that. Refusals and timeouts are counted, and logged at most once per interval
with the number since the last line, so a flood cannot flood the log too.

The head deadline needs one entry per connection waiting for a head, kept in a dict in the
order the waits began: the sweep that closes the late ones stops at the first one still in
time, so its cost is the number it closes, not the number open.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
from pathlib import Path

import httptools
import structlog

from mirror.metrics import Metrics
from mirror.oci.errors import ErrorCode, error_body

log = structlog.get_logger("mirror.connections")

# Its socket, the cached blob file it may be reading, and the two duplicates (socket, file)
# a sendfile transfer holds while it waits for the client (measured: ~3,100 at 1,000 clients).
FDS_PER_CONNECTION = 4
RESERVED_FDS = 256  # listeners, logs, the access index, temp files of downloads, slack
LOG_EVERY = 10.0  # seconds between two log lines about refusals (or timeouts)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def connection_cap(configured: int, fd_limit: int, reserved: int) -> int:
    """How many client connections may be open at once: `configured`, or fewer when the
    descriptor limit, less what serving needs, cannot hold that many."""
    return max(1, min(configured, (fd_limit - reserved) // FDS_PER_CONNECTION))


def serving_reserve(upstream_connections: int, sendfile_threads: int) -> int:
    """Descriptors kept for serving: the upstream pool, the duplicates each sendfile thread
    holds (socket and file), and RESERVED_FDS for the rest."""
    return RESERVED_FDS + upstream_connections + 2 * sendfile_threads


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at the kernel's nr_open when the
    hard limit is unlimited). Returns (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        try:
            wanted = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            wanted = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError):
            wanted = soft  # not allowed here: keep what we have, the cap follows it
    else:
        wanted = soft
    return soft, wanted, hard


def reset(transport: asyncio.Transport | None) -> None:
    """End a connection with a TCP reset. abort() alone closes the socket, and the kernel then
    sends what is still queued followed by a FIN: a client that stopped reading leaves an
    orphan in FIN-WAIT-1 holding its send queue (megabytes) for minutes. With SO_LINGER 0,
    close() drops the queue and sends RST."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # already gone: abort() below is all there is to do
    transport.abort()


class ThrottledLog:
    """Counts one kind of event and lets a log line through at most every LOG_EVERY seconds,
    with the number of events since the previous line."""

    def __init__(self, event: str, loop: asyncio.AbstractEventLoop) -> None:
        self._event = event
        self._loop = loop
        self._pending = 0
        self._logged_at = -LOG_EVERY

    def add(self, **fields: object) -> None:
        self._pending += 1
        self.flush(**fields)

    def flush(self, **fields: object) -> None:
        now = self._loop.time()
        if self._pending and now - self._logged_at >= LOG_EVERY:
            log.warning(self._event, count=self._pending, **fields)
            self._pending = 0
            self._logged_at = now


class ClientConnections:
    """The open client connections of one listener: each is admitted under the cap or refused
    with a 503, and closed when its request head does not arrive in time. Protocols report
    in: `admit` when a connection is made, `head_started`/`head_done` around each request head
    (a connection is waiting for its first one from the moment it is admitted), `release`
    when it is lost."""

    def __init__(
        self,
        limit: int,
        header_timeout: float,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
    ) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self._loop = loop
        self._metrics = metrics
        self._open: set[asyncio.Transport] = set()
        # Waiting for a complete request head, since (loop time); insertion order is time order.
        self._heads: dict[asyncio.Transport, float] = {}
        self._refused = ThrottledLog("connections_refused", loop)
        self._timed_out = ThrottledLog("request_head_timeouts", loop)
        self._refusal = _refusal_response(limit)
        # Often enough that a deadline is overrun by at most a quarter of itself (or 1 s).
        self._every = min(max(header_timeout / 4, 0.01), 1.0)
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._open)

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._every, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def close_all(self) -> None:
        for transport in list(self._open):
            transport.close()

    def admit(self, transport: asyncio.Transport) -> bool:
        """True: the connection counts from now on. False: it was answered 503 and closed."""
        if len(self._open) >= self.limit:
            self._metrics.connections_dropped.labels("limit").inc()
            peer = transport.get_extra_info("peername")
            self._refused.add(
                limit=self.limit, last_client=peer[0] if isinstance(peer, tuple) else None
            )
            transport.write(self._refusal)
            transport.close()
            return False
        self._open.add(transport)
        self._heads[transport] = self._loop.time()
        return True

    def release(self, transport: asyncio.Transport) -> None:
        self._open.discard(transport)
        self._heads.pop(transport, None)

    def head_started(self, transport: asyncio.Transport) -> None:
        if transport not in self._heads:  # the first byte of a wait already counting keeps it
            self._heads[transport] = self._loop.time()

    def head_done(self, transport: asyncio.Transport) -> None:
        self._heads.pop(transport, None)

    def _sweep(self) -> None:
        self._sweeper = self._loop.call_later(self._every, self._sweep)
        cutoff = self._loop.time() - self.header_timeout
        late = []
        for transport, since in self._heads.items():
            if since > cutoff:
                break
            late.append(transport)
        for transport in late:
            del self._heads[transport]
            self._metrics.connections_dropped.labels("header_timeout").inc()
            peer = transport.get_extra_info("peername")
            self._timed_out.add(
                timeout=self.header_timeout,
                last_client=peer[0] if isinstance(peer, tuple) else None,
            )
            if transport.get_write_buffer_size():
                reset(transport)  # answers it does not read: nothing to wait for
            else:
                transport.close()
        self._refused.flush(limit=self.limit)
        self._timed_out.flush(timeout=self.header_timeout)


def _refusal_response(limit: int) -> bytes:
    body = error_body(
        ErrorCode.UNAVAILABLE,
        "the mirror is serving as many connections as it may; try again or another host",
        {"max_connections": limit},
    )
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n"
        b"Docker-Distribution-API-Version: registry/2.0\r\n\r\n%s" % (len(body), body)
    )


class HeadWatch(asyncio.Protocol):
    """In front of aiohttp's protocol for one connection: passes everything through, and
    follows request boundaries with a parser of its own (aiohttp's is not observable) so that
    ClientConnections can enforce the head deadline after a hand-over too."""

    def __init__(
        self, inner: asyncio.Protocol, connections: ClientConnections, admitted: bool
    ) -> None:
        self._inner = inner
        self._connections = connections
        self._admitted = admitted
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's are no subclasses of asyncio's, so nothing to check.
        stream: asyncio.Transport = transport  # type: ignore[assignment]
        if not self._admitted and not self._connections.admit(stream):
            return
        self._admitted = True
        self._transport = stream
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return  # refused: aiohttp never saw it
        self._connections.release(self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        if self._parser is not None:
            self._follow(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._transport is not None else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _follow(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The head is complete; what follows is parsed afresh (the mirror upgrades
            # nothing, so it is more HTTP, or garbage that aiohttp refuses).
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._parser = httptools.HttpRequestParser(self)
            if offset < len(data):
                self._follow(data[offset:])
        except httptools.HttpParserError:
            # aiohttp answers 400 and closes; no further head to wait for.
            self._parser = None
            if self._transport is not None:
                self._connections.head_done(self._transport)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._transport is not None:
            self._connections.head_started(self._transport)

    def on_headers_complete(self) -> None:
        if self._transport is not None:
            self._connections.head_done(self._transport)
