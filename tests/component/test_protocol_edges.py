"""Protocol edges, over raw sockets, against the production server with the manifest fast
path on and off: whichever path a request meets, it gets the same answer, and nothing a
client sends gets no answer, a 500, a 200 aiohttp's parser would refuse, or a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from .fakeregistry import FakeRegistry, Image
from .harness import Served, mirror_config

TAG = "/v2/team/app/manifests/1.0?ns=fake.test"


@pytest.fixture(params=[True, False], ids=["fast_path", "aiohttp"])
async def served(
    request: pytest.FixtureRequest, tmp_path: Path, fake: FakeRegistry
) -> AsyncIterator[Served]:
    config = mirror_config(tmp_path / "cache", fake.url)
    server = await Served.start(
        replace(config, server=replace(config.server, fast_path=request.param))
    )
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def image(served: Served, fake: FakeRegistry) -> Image:
    """team/app:1.0, its tag and manifest warm in the mirror: what the fast path answers."""
    image = fake.add_image("team/app", "1.0", [b"edge" * 1000])
    for target in (TAG, f"/v2/team/app/blobs/{image.layers[0]}?ns=fake.test"):
        status, _, _ = await answer(served, f"GET {target} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        assert status == 200
    return image


class Answer:
    def __init__(self, head: bytes, body: bytes, closed: bool) -> None:
        self.head, self.body, self.closed = head, body, closed
        self.status = int(head.split(b" ", 2)[1])

    def header(self, name: str) -> str | None:
        found = re.search(rb"\r\n" + name.encode() + rb": ([^\r]*)\r\n", self.head, re.I)
        return found.group(1).decode() if found else None

    def error(self) -> dict[str, object]:
        assert self.header("Content-Type") == "application/json", self.head
        [error] = json.loads(self.body)["errors"]
        return dict(error)


async def answer(
    served: Served, raw: bytes, then: bytes = b""
) -> tuple[int, Answer, Answer | None]:
    """Send `raw`, read one whole answer; if `then` is given, send it on the same connection
    and read its answer too (None when the server closed the connection instead)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(raw)
        first = await _read(reader, head_only=raw.startswith(b"HEAD "))
        second = None
        if then and not first.closed:
            writer.write(then)
            try:
                second = await _read(reader, head_only=False)
            except asyncio.IncompleteReadError:
                second = None
        return first.status, first, second
    finally:
        writer.close()


async def _read(reader: asyncio.StreamReader, head_only: bool) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.I)
    body = b""
    if length and not head_only:
        body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)
    closed = (
        b"Connection: close" in head or head.startswith(b"HTTP/1.0") or head.startswith(b"HTTP/0.9")
    )
    if closed:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and the server did close it
    return Answer(head, body, closed)


def get(target: str, *headers: str, method: str = "GET") -> bytes:
    return ("\r\n".join([f"{method} {target} HTTP/1.1", "Host: m", *headers]) + "\r\n\r\n").encode()


async def test_a_range_with_a_5000_digit_number_is_a_416(served: Served, image: Image) -> None:
    size = len(b"edge" * 1000)
    target = f"/v2/team/app/blobs/{image.layers[0]}?ns=fake.test"
    status, past_end, _ = await answer(served, get(target, f"Range: bytes={'9' * 5000}-"))
    assert status == 416
    assert past_end.header("Content-Range") == f"bytes */{size}"
    assert past_end.error()["code"] == "RANGE_INVALID"
    # A huge last byte means "to the end", as any number past the end does.
    status, tail, _ = await answer(served, get(target, f"Range: bytes=10-{'9' * 5000}"))
    assert status == 206
    assert tail.header("Content-Range") == f"bytes 10-{size - 1}/{size}"
    assert tail.body == (b"edge" * 1000)[10:]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_invalid_tag_is_an_unknown_manifest(
    served: Served, image: Image, fake: FakeRegistry, method: str
) -> None:
    """The distribution-spec conformance suite asks for .INVALID_MANIFEST_NAME: 404."""
    fake.reset_log()
    target = "/v2/team/app/manifests/.INVALID_MANIFEST_NAME?ns=fake.test"
    status, got, _ = await answer(served, get(target, method=method))
    assert status == 404
    if method == "GET":
        assert got.error()["code"] == "MANIFEST_UNKNOWN"
    else:
        assert got.body == b""
    assert fake.log == []  # nothing worth asking the origin


@pytest.mark.parametrize(
    "upgrade",
    [
        ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"),
        ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
    ],
    ids=["h2c", "websocket"],
)  # fmt: skip
async def test_an_upgrade_is_answered_as_http_1_1(
    served: Served, image: Image, upgrade: tuple[str, ...]
) -> None:
    """curl --http2 on an http:// URL asks for h2c: the answer is plain HTTP/1.1, and the
    connection goes on serving HTTP/1.1."""
    status, first, second = await answer(served, get(TAG, *upgrade), then=get(TAG))
    assert status == 200 and first.head.startswith(b"HTTP/1.1 200 OK")
    assert first.body == image.manifest and first.header("Upgrade") is None
    assert second is not None and second.status == 200 and second.body == image.manifest


async def test_connect_is_refused_and_the_connection_closed(served: Served, image: Image) -> None:
    raw = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    status, got, after = await answer(served, raw, then=b"\x16\x03\x01\x00\x05hello")
    assert status == 405
    assert got.error()["code"] == "UNSUPPORTED"
    assert got.closed and after is None  # nothing is tunnelled


async def test_ns_is_percent_decoded_once(served: Served, image: Image) -> None:
    status, once, _ = await answer(served, get("/v2/team/app/manifests/1.0?ns=fake%2Etest"))
    assert status == 200 and once.body == image.manifest
    status, twice, _ = await answer(served, get("/v2/team/app/manifests/1.0?ns=fake%252Etest"))
    assert status == 403
    error = twice.error()
    assert error["code"] == "DENIED"
    assert error["detail"]["registry"] == "fake%2etest"  # type: ignore[index]


BAD_HEADS = {
    # What aiohttp's parser refuses (and the fast path answered with a 200 before).
    "http/0.9": f"GET {TAG}\r\n\r\n".encode(),
    "9000-byte header name": get(TAG, "X" * 9000 + ": y"),
    "a value past 8190": get(TAG, "X-Long: " + "v" * 8191),
    "129 headers": get(TAG, *(f"X-{i}: y" for i in range(128))),
    "two Host headers": get(TAG, "Host: again"),
    "no Host in HTTP/1.1": f"GET {TAG} HTTP/1.1\r\n\r\n".encode(),
    "a request line past 8190": get("/v2/team/app/manifests/1.0?ns=fake.test&x=" + "y" * 8190),
    # Not HTTP at all.
    "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03hello\r\n\r\n",
    "bad version": f"GET {TAG} HTTP/9.9\r\nHost: m\r\n\r\n".encode(),
    "space in a header name": get(TAG, "Bad Name: y"),
}


@pytest.mark.parametrize("raw", BAD_HEADS.values(), ids=BAD_HEADS.keys())
async def test_what_aiohttp_refuses_is_refused_on_both_paths(
    served: Served, image: Image, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with capture_logs() as logs, caplog.at_level(logging.DEBUG):
        status, got, _ = await answer(served, raw)
    assert status == 400, got.head
    assert got.error()["code"] == "BAD_REQUEST"
    assert got.closed
    assert got.header("X-Request-ID") and got.header("Docker-Distribution-API-Version")
    # One structured warning at most, never a traceback.
    assert [e["log_level"] for e in logs if e["log_level"] != "info"] in ([], ["warning"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_a_flood_of_garbage_costs_a_warning_a_second(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with capture_logs() as logs, caplog.at_level(logging.DEBUG):
        for _ in range(30):
            status, got, _ = await answer(served, b"GARBAGE\r\n\r\n")
            assert status == 400 and got.error()["code"] == "BAD_REQUEST"
    seconds = time.monotonic() - started
    warnings = [e for e in logs if e["event"] == "bad_request"]
    assert 1 <= len(warnings) <= seconds + 1  # at most one a second: the first, then a count
    assert set(warnings[0]) >= {"reason", "client", "suppressed"}
    assert "GARBAGE" not in repr(warnings)  # the request's bytes never reach the log
    assert not caplog.records  # aiohttp's own "Error handling request" traceback is gone
