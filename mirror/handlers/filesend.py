"""Cached blobs to the socket with the kernel's sendfile, under uvloop too.

uvloop has no loop.sendfile, so aiohttp's FileResponse falls back to reading 256 KiB pieces in
an executor and writing them through the transport: a few hundred MB/s where nginx does GB/s.
Here the headers go out through aiohttp as usual, then a worker thread runs os.sendfile on a
duplicate of the socket's descriptor until the body is out. The kernel copies page cache to
socket, the event loop never waits on a disk read, and the dup keeps the descriptor number from
being reused under the thread if the connection is torn down meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from concurrent.futures import Executor
from pathlib import Path

from aiohttp import web

IDLE_TIMEOUT = 60.0  # a client that takes no byte for this long is dropped


def _sendfile_blocking(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """Runs in a worker thread on descriptors of its own (dups), which it closes: whatever
    the event loop closes meanwhile, these numbers cannot be reused under it."""
    sent = 0
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    try:
        while sent < count:
            try:
                n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
            except BlockingIOError:
                if not poller.poll(IDLE_TIMEOUT * 1000):
                    raise TimeoutError("client took no data") from None
                continue
            if n == 0:
                raise OSError("file ended before the announced length")
            sent += n
    finally:
        os.close(sock_fd)
        os.close(file_fd)
    return sent


async def send_file(
    request: web.Request,
    path: Path,
    start: int,
    end: int,
    response: web.StreamResponse,
    executor: Executor,
) -> int:
    """Send bytes start..end (inclusive) of `path` as the body of `response` (not yet prepared;
    status and headers set by the caller). Returns the body bytes sent."""
    count = end - start + 1
    response.content_length = count
    file_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await response.prepare(request)
        await send_rest(request, file_fd, start, count, executor)
    finally:
        os.close(file_fd)
    await response.write_eof()
    return count


async def send_rest(
    request: web.Request, file_fd: int, offset: int, count: int, executor: Executor
) -> None:
    """Send `count` bytes of `file_fd` from `offset` as the rest of a prepared response's body."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise ConnectionResetError("connection lost")
    # Whatever aiohttp wrote (headers, earlier body) must be on the wire before the thread
    # writes around the transport.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + IDLE_TIMEOUT
    while transport.get_write_buffer_size():
        if loop.time() > deadline:
            raise TimeoutError("client took no data")
        await asyncio.sleep(0.001)
    if count:
        sock_fd = os.dup(sock.fileno())
        try:
            thread_file = os.dup(file_fd)
        except OSError:
            os.close(sock_fd)
            raise
        transfer = loop.run_in_executor(
            executor, _sendfile_blocking, sock_fd, thread_file, offset, count
        )
        try:
            await asyncio.shield(transfer)
        except asyncio.CancelledError:
            # Cancelled (shutdown): stop the thread by shutting the connection down under it,
            # rather than leave it writing into a connection its owner has given up on.
            _shutdown(sock.fileno())
            raise


def _shutdown(fd: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
