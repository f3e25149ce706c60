"""The manifest fast path answers exactly what the full handler would, and hands over cleanly.

Both servers run the real `mirror.cli.serve.serve` on a free port: one with the fast path, one
without, over caches filled the same way. Every answer is compared byte for byte (apart from
Date, Server and X-Request-ID). Raw sockets let the tests control how requests are split into
packets, which is where a hand-over bug would hide.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from mirror.cli.serve import serve
from mirror.http.fastpath import MAX_ANSWER_BYTES

from .fakeregistry import FakeRegistry, Image
from .harness import mirror_config

OCI = "application/vnd.oci.image.manifest.v1+json"
TAG = "/v2/team/app/manifests/1.0?ns=fake.test"
VOLATILE = {"date", "server", "x-request-id"}


class Served:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def _start(
    config_dir: Path, fake: FakeRegistry, fast: bool
) -> tuple[Served, asyncio.Event, asyncio.Task[None]]:
    config = mirror_config(config_dir, fake.url)
    config = replace(config, server=replace(config.server, fast_path=fast, access_log=False))
    stop = asyncio.Event()
    ports: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, lambda socks: ports.set_result(socks[0][1])))
    port = await asyncio.wait_for(ports, 10)
    return Served(port), stop, task


@pytest.fixture
async def servers(tmp_path: Path, fake: FakeRegistry) -> AsyncIterator[tuple[Served, Served]]:
    fast, fast_stop, fast_task = await _start(tmp_path / "fast", fake, True)
    slow, slow_stop, slow_task = await _start(tmp_path / "slow", fake, False)
    try:
        yield fast, slow
    finally:
        fast_stop.set()
        slow_stop.set()
        await asyncio.gather(fast_task, slow_task)


async def _raw(port: int, pieces: list[bytes], expect_responses: int) -> list[tuple[bytes, bytes]]:
    """Send requests in the given pieces (a pause between each), read N whole responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        responses = []
        for _ in range(expect_responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await asyncio.wait_for(reader.readexactly(length), 5)
            responses.append((head, body))
        return responses
    finally:
        writer.close()


async def _answer(
    url: str, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, headers=headers or {}) as resp:
            body = await resp.read()
            kept = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in VOLATILE}
            return resp.status, kept, body


async def _warm(served: Served, image: Image) -> None:
    """Pull the tag and its digest once, so both are in the mirror's memory."""
    for path in (TAG, f"/v2/team/app/manifests/{image.digest}?ns=fake.test"):
        status, _, _ = await _answer(served.url, "GET", path)
        assert status == 200


CASES = [
    ("GET", "/v2/team/app/manifests/1.0?ns=fake.test", {}),
    ("HEAD", "/v2/team/app/manifests/1.0?ns=fake.test", {"Accept": f"{OCI}, */*"}),
    ("GET", "/v2/fake.test/team/app/manifests/1.0", {"Accept": OCI}),
    ("HEAD", "/v2/fake.test/team/app/manifests/1.0", {}),
    (
        "GET",
        "/v2/team/app/manifests/1.0?ns=fake.test",
        {"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    ),
    ("GET", "/v2/team/app/manifests/1.0?ns=unknown.example", {}),
    ("GET", "/v2/team/app/manifests/1.0?ns=fake%25252Etest", {}),  # decoded as often
    ("GET", "/v2/team/app/manifests/sha256:nothex?ns=fake.test", {}),
    ("GET", "/v2/Team/app/manifests/1.0?ns=fake.test", {}),
]


async def test_fast_answers_equal_full_answers(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"layer" * 100])
    for served in servers:
        await _warm(served, image)
    fast, slow = servers
    cases = CASES + [
        ("GET", f"/v2/team/app/manifests/{image.digest}?ns=fake.test", {}),
        ("HEAD", f"/v2/fake.test/team/app/manifests/{image.digest}", {"Accept": OCI}),
    ]
    for method, path, headers in cases:
        got = await _answer(fast.url, method, path, headers)
        want = await _answer(slow.url, method, path, headers)
        assert got == want, (method, path, headers)


async def test_fast_path_serves_a_fresh_tag_without_aiohttp(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    fake.add_image("team/app", "1.0", [b"x" * 1000])
    fast, _ = servers
    path = "/v2/team/app/manifests/1.0?ns=fake.test"
    # A connection whose first request went to aiohttp stays there: use a fresh one each time.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.head(fast.url + path) as first:
            assert first.status == 200 and "aiohttp" in first.headers.get("Server", "")  # a miss
        before = len(fake.log)
        async with session.head(fast.url + path) as second:
            assert second.status == 200
            assert "Server" not in second.headers  # answered before aiohttp saw it
            assert second.headers["Content-Length"] == first.headers["Content-Length"]
            assert second.headers["Docker-Content-Digest"] == first.headers["Docker-Content-Digest"]
    assert len(fake.log) == before  # and no upstream request


async def test_one_connection_mixes_fast_and_full_requests(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"y" * 5000])
    fast, _ = servers
    await _warm(fast, image)
    tag = b"GET /v2/team/app/manifests/1.0?ns=fake.test HTTP/1.1\r\nHost: x\r\n\r\n"
    blob = f"GET /v2/team/app/blobs/{image.layers[0]}?ns=fake.test HTTP/1.1\r\n".encode()
    blob += b"Host: x\r\n\r\n"
    # two pipelined fast answers, then a blob (hand-over to aiohttp), then a tag again
    answers = await _raw(fast.port, [tag + tag, blob, tag], 4)
    assert [head.split(b"\r\n")[0] for head, _ in answers] == [b"HTTP/1.1 200 OK"] * 4
    assert [body for _, body in answers] == [
        image.manifest,
        image.manifest,
        b"y" * 5000,
        image.manifest,
    ]
    assert [b"Server:" in head for head, _ in answers] == [False, False, True, True]


async def test_a_request_split_across_packets_is_still_answered(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"z" * 10])
    fast, _ = servers
    await _warm(fast, image)
    pieces = [b"GET /v2/team/app/manif", b"ests/1.0?ns=fake.test HTTP/1.1\r\nHost: x\r\n\r\n"]
    [(head, body)] = await _raw(fast.port, pieces, 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and body == image.manifest


async def test_connection_close_is_honoured(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"w" * 10])
    fast, _ = servers
    await _warm(fast, image)
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
    writer.write(
        b"GET /v2/team/app/manifests/1.0?ns=fake.test HTTP/1.1\r\n"
        b"Host: x\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 5)  # returns only once the server closes
    writer.close()
    assert (
        data.startswith(b"HTTP/1.1 200 OK")
        and b"Connection: close" in data
        and data.endswith(image.manifest)
    )


async def test_pipelined_flood_goes_to_aiohttp_past_the_answer_cap(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    # 600 pipelined GETs of a cached manifest must not be answered as one giant buffer.
    image = fake.add_image("team/app", "1.0", [b"q" * 10])
    fast, _ = servers
    await _warm(fast, image)
    tag = b"GET /v2/team/app/manifests/1.0?ns=fake.test HTTP/1.1\r\nHost: x\r\n\r\n"
    count = MAX_ANSWER_BYTES // len(image.manifest) + 50
    answers = await _raw(fast.port, [tag * count], count)
    assert [body for _, body in answers] == [image.manifest] * count
    assert all(b"Server:" in head for head, _ in answers)  # aiohttp answered them, in order
