"""Serving clients of every kind: cached blobs go out with the kernel's sendfile from a small
pool of threads, a client that stops reading waits on the event loop (not in a thread) and is
dropped after the idle timeout, and a client that hangs up is one field of the access line."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from mirror.app import create_app

from .clients import open_fds_under, parse_head, read_to_end, stalled_client
from .conftest import MakeMirror
from .fakeregistry import FakeRegistry
from .harness import KiB, MiB, Mirror, mirror_config, poll, random_bytes, wait_cached

FAKE = {"ns": "fake.test"}
NAME = "team/app"
CHUNK = 64 * KiB  # the test config's upstream.chunk_size


def blob_path(digest: str) -> str:
    return f"/v2/{NAME}/blobs/{digest}?ns=fake.test"


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

    stalled = [
        await stalled_client(mirror.client.port, blob_path(digest)) for _ in range(3 * threads)
    ]
    try:
        await asyncio.sleep(0.3)  # their socket buffers fill; each transfer now waits on them
        # With a thread held per waiting transfer, this one would queue behind them until
        # they gave up (a minute).
        resp = await asyncio.wait_for(
            mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE), 5
        )
        assert resp.status == 200
        assert await asyncio.wait_for(resp.read(), 5) == data

        for _, reader, _ in stalled:  # and the slow ones still get every byte when they resume
            body = await asyncio.wait_for(reader.readexactly(len(data)), 10)
            assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    finally:
        for _, _, writer in stalled:
            writer.close()


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
async def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(
    fake: FakeRegistry, aiohttp_client: Any, tmp_path: Path, cached: bool
) -> None:
    config = mirror_config(tmp_path / "cache", fake.url, chunk_size=MiB)
    config = replace(config, server=replace(config.server, client_idle_timeout=0.5))
    app = create_app(config)
    mirror = Mirror(await aiohttp_client(app), app, config)
    data = random_bytes(32 * MiB, 41)  # far more than the socket buffers hold
    digest = fake.add_blob(NAME, data)
    if cached:
        resp = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
        assert await resp.read() == data
        await wait_cached(mirror, digest)

    head, reader, writer = await stalled_client(mirror.client.port, blob_path(digest))
    try:
        assert parse_head(head)[0] == 200
        await wait_cached(mirror, digest)
        # Its response held a descriptor on the blob (and, cached, a pin against eviction):
        # both go once the idle timeout has dropped it, not when it resumes (never, maybe).
        blobs, tmp = config.cache.directory / "blobs", config.cache.directory / "tmp"
        await poll(
            lambda: open_fds_under(blobs) + open_fds_under(tmp) == 0,
            within=20,
            what="the stuck reader's fd",
        )
        body, _ = await read_to_end(reader)
        assert len(body) < len(data)  # the connection was ended under it
    finally:
        writer.close()


async def test_a_slow_client_that_keeps_reading_is_never_dropped(
    fake: FakeRegistry, aiohttp_client: Any, tmp_path: Path
) -> None:
    """A node on a slow link may take far longer than the idle timeout over one chunk, yet it
    takes bytes all along: only a client that takes none may be cut (a reset is fatal to
    containerd, which would pull the layer again from the start). More than the kernel's
    socket buffers hold, so the mirror's own buffer backs up behind the client."""
    config = mirror_config(tmp_path / "cache", fake.url, chunk_size=MiB)
    config = replace(config, server=replace(config.server, client_idle_timeout=0.3))
    app = create_app(config)
    mirror = Mirror(await aiohttp_client(app), app, config)
    data = random_bytes(6 * MiB, 43)
    digest = fake.add_blob(NAME, data)
    fake.fault("slow_body", kind="blob", rate=16 * MiB)  # ahead of the client, not done at once

    head, reader, writer = await stalled_client(mirror.client.port, blob_path(digest))
    try:
        assert parse_head(head)[0] == 200
        body = bytearray()
        while chunk := await asyncio.wait_for(reader.read(16 * KiB), 10):
            body += chunk
            await asyncio.sleep(0.01)  # ~1.6 MB/s: a 1 MiB chunk takes 0.6 s to drain
        assert len(body) == len(data)
        assert bytes(body) == data
    finally:
        writer.close()


async def test_a_client_hanging_up_mid_blob_is_one_field_of_the_access_line(
    fake: FakeRegistry, mirror: Mirror, caplog: pytest.LogCaptureFixture
) -> None:
    data = random_bytes(MiB, 42)
    digest = fake.add_blob(NAME, data)
    stall = fake.fault("stall", kind="blob", range_start=8 * CHUNK, after=8 * KiB)
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        resp = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
        got = await resp.content.readexactly(100 * KiB)
        await stall.reached.wait()
        resp.close()  # mid-body: the mirror notices at its next write
        stall.release()
        await wait_cached(mirror, digest)
        await poll(lambda: any(e["event"] == "request" for e in logs), what="the access line")
    assert got == data[: len(got)]
    [line] = [e for e in logs if e["event"] == "request"]
    # 499 when aiohttp's test server cancelled the handler before its next write noticed.
    assert line["status"] in (200, 499)
    assert line["aborted"] is True
    assert 100 * KiB <= line["bytes"] < len(data)  # what was written, not 0
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


async def test_a_whole_response_has_no_aborted_field(fake: FakeRegistry, mirror: Mirror) -> None:
    data = random_bytes(MiB, 43)
    digest = fake.add_blob(NAME, data)
    with capture_logs() as logs:
        resp = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
        assert await resp.read() == data
        await poll(lambda: any(e["event"] == "request" for e in logs), what="the access line")
    [line] = [e for e in logs if e["event"] == "request"]
    assert line["bytes"] == len(data)
    assert "aborted" not in line


async def test_a_hang_up_escaping_a_handler_is_logged_as_aborted_not_as_an_error(
    fake: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The production runner: aiohttp's test server cancels a handler when its client goes,
    # the real one (handler_cancellation off) lets the handler's next write raise instead.
    app = create_app(mirror_config(tmp_path / "cache", fake.url))
    ended = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1 << 40
        await response.prepare(request)
        try:
            while True:  # no handling of its own: the reset escapes to the middleware
                await response.write(b"x" * 64 * KiB)
                await asyncio.sleep(0.005)
        finally:
            ended.set()

    app.router.add_get("/endless", endless)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        caplog.set_level(logging.DEBUG)
        with capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /endless HTTP/1.1\r\nHost: mirror\r\n\r\n")
            await reader.readexactly(256 * KiB)
            writer.close()
            await ended.wait()
            await poll(lambda: any(e["event"] == "request" for e in logs), what="the access line")
    finally:
        await runner.cleanup()
    [line] = [e for e in logs if e["event"] == "request"]
    assert line["aborted"] is True
    assert not [e for e in logs if e["event"] == "unhandled_error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
