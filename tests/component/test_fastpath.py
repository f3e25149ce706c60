"""The manifest fast path answers byte for byte what aiohttp would, and hands over cleanly.

Two mirrors run as production runs them (create_app, the runner, the same protocol factory on
a free port): one with the fast path, one without, over caches filled the same way. Answers
are compared as raw bytes, apart from the values of Date and X-Request-ID. Raw sockets also
let the tests control how requests are split into packets, where a hand-over bug would hide.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.http.fastpath import MAX_ANSWER_BYTES

from .fakeregistry import FakeRegistry, Image
from .harness import Served, mirror_config

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
TAG = "/v2/team/app/manifests/1.0?ns=fake.test"
REQUEST_ID = re.compile(rb"\r\nX-Request-ID: ([^\r]*)\r\n")


async def start(tmp_path: Path, fake: FakeRegistry, fast: bool) -> Served:
    config = mirror_config(tmp_path / ("fast" if fast else "aiohttp"), fake.url)
    return await Served.start(replace(config, server=replace(config.server, fast_path=fast)))


@pytest.fixture
async def servers(tmp_path: Path, fake: FakeRegistry) -> AsyncIterator[tuple[Served, Served]]:
    fast, full = await start(tmp_path, fake, True), await start(tmp_path, fake, False)
    try:
        yield fast, full
    finally:
        await fast.stop()
        await full.stop()


def aiohttp_requests(served: Served) -> int:
    """Requests that reached aiohttp's protocol (the fast path's answers never do)."""
    assert served.runner.server is not None
    return served.runner.server.requests_count


async def exchange(port: int, pieces: list[bytes], responses: int) -> list[tuple[bytes, bytes]]:
    """Send requests in the given pieces (a pause between each), read N whole responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        out = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await asyncio.wait_for(reader.readexactly(length), 5)
            out.append((head, body))
        return out
    finally:
        writer.close()


async def whole_answer(port: int, request: bytes) -> bytes:
    """The whole answer to one request on a new connection: its head, and the body its
    Content-Length announces (none for HEAD)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        if request.startswith(b"HEAD ") or length is None:
            return head
        return head + await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)
    finally:
        writer.close()


def comparable(answer: bytes) -> bytes:
    answer = re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", answer)
    return REQUEST_ID.sub(b"\r\nX-Request-ID: -\r\n", answer)


def request(method: str, target: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: mirror", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def warm(served: Served, image: Image) -> None:
    """Pull the tag and its digest once, so both are in the mirror's memory."""
    for target in (TAG, f"/v2/team/app/manifests/{image.digest}?ns=fake.test"):
        answer = await whole_answer(served.port, request("GET", target))
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer


def cases(image: Image) -> list[tuple[bytes, bool]]:
    """(request, whether the fast path answers it itself) for a warm tag and digest."""
    by_digest = f"/v2/team/app/manifests/{image.digest}?ns=fake.test"
    return [
        (request("GET", TAG), True),
        (request("HEAD", TAG, f"Accept: {OCI}, */*"), True),
        (request("GET", "/v2/fake.test/team/app/manifests/1.0", f"Accept: {OCI}"), True),
        (request("HEAD", "/v2/fake.test/team/app/manifests/1.0"), True),
        (request("GET", by_digest), True),
        (request("HEAD", f"/v2/fake.test/team/app/manifests/{image.digest}"), True),
        (request("GET", TAG, f"Accept: {DOCKER_V2}", f"Accept: {OCI}"), True),  # skopeo's lines
        (request("GET", TAG, "Connection: close"), True),
        (request("GET", TAG, "X-Request-ID: trace-me.1"), True),
        (request("GET", TAG, "X-Request-ID: not a valid id"), True),
        (request("GET", TAG, version="1.0"), True),  # no keep-alive, and no Connection header
        (request("GET", TAG, "Connection: keep-alive", version="1.0"), True),
        (request("GET", "/v2/team/app/manifests/1.0?ns=fake%2Etest"), True),
        (request("GET", TAG, f"Accept: {DOCKER_V2}"), False),  # not acceptable: 404
        (request("GET", "/v2/team/app/manifests/1.0?ns=unknown.example"), False),
        (request("GET", "/v2/team/app/manifests/1.0?ns=fake%252Etest"), False),  # decoded once
        (request("GET", "/v2/team/app/manifests/sha256:nothex?ns=fake.test"), False),
        (request("GET", "/v2/team/app/manifests/.INVALID_MANIFEST_NAME?ns=fake.test"), False),
        (request("GET", "/v2/Team/app/manifests/1.0?ns=fake.test"), False),
        (request("GET", f"{TAG}#fragment"), False),
        (request("GET", "/v2/team/%61pp/manifests/1.0?ns=fake.test"), False),
        (request("GET", TAG, "Expect: 100-continue"), False),
        (request("GET", TAG, "Content-Length: 0"), False),
        (request("GET", TAG, "X-Long: " + "v" * 8000), False),  # aiohttp's to judge: a 200
    ]


async def test_fast_answers_are_byte_identical_to_aiohttps(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"layer" * 100])
    for served in servers:
        await warm(served, image)
    fast, full = servers
    for raw, answered_fast in cases(image):
        before = aiohttp_requests(fast)
        got, want = await whole_answer(fast.port, raw), await whole_answer(full.port, raw)
        assert comparable(got) == comparable(want), raw
        assert (aiohttp_requests(fast) == before) is answered_fast, raw


async def test_request_ids_follow_one_rule_on_both_paths(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    """A sane id from the client is kept (a node-local mirror passes its own on); anything
    else gets a fresh one, never the same twice, on either path and for errors too."""
    image = fake.add_image("team/app", "1.0", [b"id" * 100])
    seen: set[bytes] = set()
    for served in servers:
        await warm(served, image)
        for target in (TAG, "/v2/team/app/manifests/nope?ns=fake.test"):
            kept = await whole_answer(served.port, request("GET", target, "X-Request-ID: a.B-9_"))
            assert REQUEST_ID.search(kept).group(1) == b"a.B-9_"  # type: ignore[union-attr]
            for bad in ("", "x" * 65, "spaces inside", "semi;colon", "é"):
                answer = await whole_answer(
                    served.port, request("GET", target, f"X-Request-ID: {bad}")
                )
                rid = REQUEST_ID.search(answer).group(1)  # type: ignore[union-attr]
                assert rid != bad.encode() and re.fullmatch(rb"[0-9a-f]{16}", rid), answer
                assert rid not in seen
                seen.add(rid)


async def test_fast_path_serves_a_fresh_tag_without_aiohttp(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    fake.add_image("team/app", "1.0", [b"x" * 1000])
    fast, _ = servers
    first = await whole_answer(fast.port, request("HEAD", TAG))  # a miss: aiohttp fetches it
    before, upstream = aiohttp_requests(fast), len(fake.log)
    for _ in range(3):
        again = await whole_answer(fast.port, request("HEAD", TAG))
        assert comparable(again) == comparable(first)
    assert aiohttp_requests(fast) == before  # answered before aiohttp saw them
    assert len(fake.log) == upstream  # and nothing asked upstream


async def test_one_connection_mixes_fast_and_full_requests(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"y" * 5000])
    fast, _ = servers
    await warm(fast, image)
    before = aiohttp_requests(fast)
    tag = f"GET {TAG} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    blob = f"GET /v2/team/app/blobs/{image.layers[0]}?ns=fake.test HTTP/1.1\r\n".encode()
    blob += b"Host: x\r\n\r\n"
    # two pipelined fast answers, then a blob (hand-over to aiohttp), then a tag again
    answers = await exchange(fast.port, [tag + tag, blob, tag], 4)
    assert [head.split(b"\r\n")[0] for head, _ in answers] == [b"HTTP/1.1 200 OK"] * 4
    assert [body for _, body in answers] == [
        image.manifest,
        image.manifest,
        b"y" * 5000,
        image.manifest,
    ]
    assert aiohttp_requests(fast) - before == 2  # the blob, and the tag after it


async def test_a_request_split_across_packets_is_still_answered(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"z" * 10])
    fast, _ = servers
    await warm(fast, image)
    pieces = [b"GET /v2/team/app/manif", b"ests/1.0?ns=fake.test HTTP/1.1\r\nHost: x\r\n\r\n"]
    [(head, body)] = await exchange(fast.port, pieces, 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and body == image.manifest


async def test_connection_close_is_honoured(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    image = fake.add_image("team/app", "1.0", [b"w" * 10])
    fast, _ = servers
    await warm(fast, image)
    before = aiohttp_requests(fast)
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
    writer.write(request("GET", TAG, "Connection: close"))
    data = await asyncio.wait_for(reader.read(), 5)  # returns only once the server closes
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data
    assert data.endswith(image.manifest)
    assert aiohttp_requests(fast) == before


async def test_pipelined_flood_goes_to_aiohttp_past_the_answer_cap(
    servers: tuple[Served, Served], fake: FakeRegistry
) -> None:
    # 600 pipelined GETs of a cached manifest must not be answered as one giant buffer.
    image = fake.add_image("team/app", "1.0", [b"q" * 10])
    fast, _ = servers
    await warm(fast, image)
    before = aiohttp_requests(fast)
    tag = f"GET {TAG} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    count = MAX_ANSWER_BYTES // len(image.manifest) + 50
    answers = await exchange(fast.port, [tag * count], count)
    assert [body for _, body in answers] == [image.manifest] * count
    assert aiohttp_requests(fast) - before == count  # aiohttp answered them, in order
