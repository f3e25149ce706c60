"""Cached blobs go out with the kernel's sendfile from a small pool of threads. A client that
stops reading waits on the event loop, not in a thread: however many nodes sit on slow links,
the next client is served at once."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from dataclasses import replace
from pathlib import Path

from .conftest import MakeMirror
from .fakeregistry import FakeRegistry
from .harness import KiB, MiB, mirror_config, random_bytes, wait_cached

FAKE = {"ns": "fake.test"}
NAME = "team/app"


async def stalled_client(
    port: int, digest: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A node that took the headers and a little of the body, then stopped reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * KiB)
    writer.write(
        f"GET /v2/{NAME}/blobs/{digest}?ns=fake.test HTTP/1.1\r\n"
        "Host: mirror\r\nConnection: close\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def test_clients_that_stop_reading_do_not_hold_the_sendfile_threads(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    base = mirror_config(tmp_path / "cache", fake.url)
    threads = 2
    mirror = await make_mirror(
        config=replace(base, server=replace(base.server, sendfile_threads=threads))
    )
    data = random_bytes(16 * MiB, 40)
    digest = fake.add_blob(NAME, data)
    resp = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
    assert await resp.read() == data
    await wait_cached(mirror, digest)

    stalled = [await stalled_client(mirror.client.port, digest) for _ in range(3 * threads)]
    try:
        await asyncio.sleep(0.3)  # their socket buffers fill; each transfer now waits on them
        # With a thread held per waiting transfer, this one would queue behind them until
        # they gave up (a minute).
        resp = await asyncio.wait_for(
            mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE), 5
        )
        assert resp.status == 200
        assert await asyncio.wait_for(resp.read(), 5) == data

        for reader, _ in stalled:  # and the slow ones still get every byte when they resume
            body = await asyncio.wait_for(reader.readexactly(len(data)), 10)
            assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    finally:
        for _, writer in stalled:
            writer.close()
