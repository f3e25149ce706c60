"""Clients of the mirror that aiohttp's test client cannot play: nodes that stop reading, raw
reads that tell a clean end of body (FIN) from a reset, and waiting for clients to arrive."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .harness import KiB, Mirror, poll


async def joined(mirror: Mirror, before: int, clients: int) -> None:
    """Until `clients` more requests reached the mirror's handlers.

    The server counts a request just before it schedules the handler's task, and a blob or
    manifest handler joins the shared download (or fetch) before its first real suspension.
    So once the count is reached, one turn of the loop has every one of them joined."""
    await poll(lambda: mirror.server_requests() - before >= clients, what="clients to arrive")
    await asyncio.sleep(0)


def request_bytes(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: mirror", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def stalled_client(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """A node that took the headers, then stopped reading. Its receive buffer is small and
    fixed (no autotuning), so the mirror soon has bytes it cannot hand over."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * KiB)
    writer.write(request_bytes(path, headers))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return head, reader, writer


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    ended: str  # "eof": a clean end (FIN); "reset": ECONNRESET

    @property
    def content_length(self) -> int:
        return int(self.headers["content-length"])


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def read_to_end(reader: asyncio.StreamReader, within: float = 20) -> tuple[bytes, str]:
    """Everything until the connection ends, and how it ended."""
    body = bytearray()
    try:
        async with asyncio.timeout(within):
            while data := await reader.read(256 * KiB):
                body += data
    except ConnectionResetError:
        return bytes(body), "reset"
    return bytes(body), "eof"


async def raw_get(port: int, path: str, headers: dict[str, str] | None = None) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(path, headers))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body, ended = await read_to_end(reader)
    finally:
        writer.close()
    status, parsed = parse_head(head)
    return RawResponse(status, parsed, body, ended)


def open_fds_under(root: Path) -> int:
    """This process's descriptors on files below `root` (the cache: readers, temp files)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                count += 1
        except OSError:
            pass  # closed meanwhile
    return count
