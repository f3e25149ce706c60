"""Cached blobs to the socket with the kernel's sendfile, under uvloop too.

uvloop has no loop.sendfile, so aiohttp's FileResponse falls back to reading 256 KiB pieces in
an executor and writing them through the transport: a few hundred MB/s where nginx does GB/s.
Here the headers go out through aiohttp as usual, then the body goes out with os.sendfile on a
duplicate of the socket's descriptor: the kernel copies page cache to socket.

The copying runs in worker threads, one slice at a time, so the event loop never waits on a
disk read. Waiting for the client to take more bytes happens on the loop (a writer callback on
the duplicate), not in a thread: a thread is held only while bytes move, so a thousand slow
nodes cannot take every thread and leave fast ones queued behind them. Slices are bounded so
transfers take turns on the threads. The duplicate keeps the descriptor number from being
reused under a thread if the connection is torn down meanwhile.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import AsyncGenerator
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass

from aiohttp import web

from mirror.cache.body import FileSpan, Segment
from mirror.http.connections import reset
from mirror.keys import config_key

SLICE = 8 << 20  # bytes one thread call may move before it lets other transfers have a turn
PATIENCE_MS = 20  # how long a thread waits for a full socket to drain before handing it back


class ClientStalled(ConnectionError):
    """The client took no byte for the idle timeout: it is dropped like one that hung up."""


@dataclass(slots=True)
class Sent:
    """Body bytes handed to the connection so far: what the access line reports, however the
    response ends."""

    bytes: int = 0


def idle_timeout(request: web.Request) -> float:
    return request.app[config_key].server.client_idle_timeout


def drop(request: web.Request) -> None:
    """End the connection of a client that hung up or stopped reading. A reset, not a close:
    a close would wait for buffered bytes to drain, which a stuck client never lets happen."""
    reset(request.transport)


class StallGuard:
    """Drops a client that takes no byte for `idle` seconds while bytes are waiting for it.

    Progress is what the client took (bytes gone from our buffer and the kernel's queue), not
    whether one write finished: a node on a slow link may take minutes over a 1 MiB chunk and
    is still reading. A deadline per write
    would cut it (and a reset is fatal to containerd); this one only cuts the stuck. One timer
    per response, checked every idle/2, so the cost does not grow with the bytes sent."""

    def __init__(self, transport: asyncio.Transport | None, idle: float) -> None:
        self._transport = transport
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        self.written = 0  # body bytes handed to the transport by the caller
        self._taken = 0
        self._progress_at = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(idle / 2, self._check)

    def _check(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            self._timer = None
            return
        # Ours and the kernel's: the kernel takes more only once much of its queue has gone,
        # so our buffer alone can sit still for a while under a client that reads steadily.
        sock = transport.get_extra_info("socket")
        waiting = transport.get_write_buffer_size() + (_unsent(sock.fileno()) if sock else 0)
        taken = self.written - waiting
        now = self._loop.time()
        if waiting == 0 or taken != self._taken:
            self._taken = taken
            self._progress_at = now
        elif now - self._progress_at >= self._idle:
            self._timer = None
            reset(transport)  # the pending write fails with a connection error: a hang-up
            return
        self._timer = self._loop.call_later(self._idle / 2, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _sendfile_slice(sock_fd: int, file_fd: int, offset: int, count: int) -> tuple[int, bool]:
    """Runs in a worker thread: send up to `count` bytes (at most SLICE). Returns (bytes sent,
    whether the client is slow and the loop should wait for its socket to drain)."""
    sent = 0
    limit = min(count, SLICE)
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while sent < limit:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, limit - sent)
        except BlockingIOError:
            # A client on a fast link drains its buffer within moments: waiting for it here
            # is far cheaper than a trip through the loop and back (measured: 0.79x nginx
            # instead of 0.94x at 50 clients). A slow one gives the thread back.
            if poller.poll(PATIENCE_MS):
                continue
            return sent, True
        if n == 0:
            raise OSError("file ended before the announced length")
        sent += n
    return sent, False


async def write_body(
    request: web.Request,
    response: web.StreamResponse,
    segments: AsyncGenerator[Segment, None],
    executor: Executor,
    sent: Sent,
) -> None:
    """Prepare `response` (status, headers and length set by the caller) and send `segments`
    as its body: file spans by sendfile on the executor, bytes through the transport. A client
    that takes no byte for the idle timeout raises ClientStalled (a ConnectionError)."""
    guard = StallGuard(request.transport, idle_timeout(request))
    try:
        await response.prepare(request)
        async with aclosing(segments) as body:
            async for segment in body:
                if isinstance(segment, FileSpan):
                    await send_rest(
                        request, segment.fd, segment.offset, segment.count, executor, sent
                    )
                    guard.written += segment.count
                else:
                    guard.written += len(segment)
                    await response.write(segment)
                    sent.bytes += len(segment)
        await response.write_eof()
    finally:
        guard.close()


async def send_rest(
    request: web.Request,
    file_fd: int,
    offset: int,
    count: int,
    executor: Executor,
    sent: Sent,
) -> None:
    """Send `count` bytes of `file_fd` from `offset` as the rest of a prepared response's body,
    counting them into `sent`. A client that takes no byte for the idle timeout raises
    ClientStalled."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise ConnectionResetError("connection lost")
    idle = idle_timeout(request)
    # Whatever aiohttp wrote (headers, earlier body) must be on the wire before the threads
    # write around the transport. Each byte the client takes restarts the idle clock.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + idle
    queued = transport.get_write_buffer_size() + _unsent(sock.fileno())
    pause = 0.001
    while transport.get_write_buffer_size():
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)  # a slow client must not cost a wake-up per millisecond
        now_queued = transport.get_write_buffer_size() + _unsent(sock.fileno())
        if now_queued < queued:
            deadline = loop.time() + idle
        elif loop.time() > deadline:
            raise ClientStalled("client took no data")
        queued = now_queued
    if not count:
        return
    # Descriptors of this transfer's own: whatever the caller or the loop closes meanwhile,
    # these numbers cannot be reused under a thread. Closed by whoever finishes last.
    sock_fd = os.dup(sock.fileno())
    try:
        thread_file = os.dup(file_fd)
    except OSError:
        os.close(sock_fd)
        raise
    running: asyncio.Future[tuple[int, bool]] | None = None
    try:
        done = 0
        while done < count:
            running = loop.run_in_executor(
                executor, _sendfile_slice, sock_fd, thread_file, offset + done, count - done
            )
            n, full = await asyncio.shield(running)
            running = None
            done += n
            sent.bytes += n
            if full:
                await _writable(loop, sock_fd, idle)
    except asyncio.CancelledError:
        # Cancelled (shutdown): end the connection under the slice in flight, rather than leave
        # it writing into a connection its owner has given up on.
        _shutdown(sock_fd)
        raise
    finally:
        if running is not None and not running.done():
            running.add_done_callback(lambda _: _close(sock_fd, thread_file))
        else:
            _close(sock_fd, thread_file)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, idle: float) -> None:
    """Until the socket can take bytes again (or has failed: the next send says how).

    The kernel reports writable only once a good part of its send queue has gone, which can
    take a slow reader longer than the idle timeout: what counts is that the queue shrinks."""
    queued = _unsent(fd)
    deadline = loop.time() + idle
    ready = loop.create_future()
    loop.add_writer(fd, _set_once, ready)
    try:
        while True:
            try:
                async with asyncio.timeout(idle / 2):
                    await asyncio.shield(ready)
                return
            except TimeoutError:
                now_queued = _unsent(fd)
                if now_queued < queued:
                    deadline = loop.time() + idle
                elif loop.time() >= deadline:
                    raise ClientStalled("client took no data") from None
                queued = now_queued
    finally:
        loop.remove_writer(fd)  # before the descriptor is closed: the poll must not outlive it


def _unsent(fd: int) -> int:
    """Bytes in the socket's send queue (not yet acknowledged by the client)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0  # gone: the next send reports how


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _shutdown(fd: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
