"""One upstream fetch per blob: coalescing, resumption, verification, readers of every speed."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from .clients import joined, raw_get, read_to_end, stalled_client
from .conftest import MakeMirror
from .fakeregistry import FakeRegistry, Fault
from .harness import KiB, MiB, Mirror, poll, random_bytes, wait_cached

FAKE = {"ns": "fake.test"}
CHUNK = 64 * KiB  # the test config's upstream.chunk_size


def blob_url(digest: str) -> str:
    return f"/v2/team/app/blobs/{digest}"


async def test_fifty_clients_cause_one_upstream_download(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    data = random_bytes(2 * MiB + 777, 10)
    digest = fake.add_blob("team/app", data)
    gate = fake.fault("hold", kind="blob", range_start=0)  # first response waits for everyone
    before = mirror.server_requests()

    async def client() -> bytes:
        resp = await mirror.client.get(blob_url(digest), params=FAKE)
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        return await resp.read()

    tasks = [asyncio.ensure_future(client()) for _ in range(50)]
    await gate.reached.wait()
    await joined(mirror, before, 50)
    gate.release()
    bodies = await asyncio.gather(*tasks)

    assert all(body == data for body in bodies)
    assert fake.download_sessions() == 1
    assert fake.body_bytes("blob") == len(data)  # every byte crossed the "long haul" once
    # ... fetched as concurrent Range requests of chunk_size, none of them overlapping
    spans = sorted(r.range_start or 0 for r in fake.requests(kind="blob", method="GET"))
    assert spans == list(range(0, len(data), CHUNK))
    assert mirror.requests("blob", "miss") == 1
    assert mirror.requests("blob", "coalesced") == 49


async def test_client_hanging_up_does_not_stop_the_download(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    data = random_bytes(MiB, 11)
    digest = fake.add_blob("team/app", data)
    stall = fake.fault("stall", kind="blob", range_start=8 * CHUNK, after=8 * KiB)

    first = await mirror.client.get(blob_url(digest), params=FAKE)  # starts the download
    assert first.status == 200
    head = await first.content.readexactly(100 * KiB)
    assert head == data[: len(head)]
    others = [await mirror.client.get(blob_url(digest), params=FAKE) for _ in range(3)]
    await stall.reached.wait()
    first.close()  # the client that started it hangs up in the middle of the body
    assert mirror.blobs.in_flight == 1
    stall.release()
    assert await asyncio.gather(*(o.read() for o in others)) == [data] * 3
    await wait_cached(mirror, digest)
    assert fake.download_sessions() == 1
    assert mirror.requests("blob", "coalesced") == 3

    fake.reset_log()
    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data
    assert fake.count(kind="blob") == 0
    # Counted once the handler returns, which may be a moment after the client's last byte.
    await poll(lambda: mirror.requests("blob", "hit") == 1, what="the hit to be counted")


@pytest.mark.parametrize("cut_at", [0, 2 * CHUNK], ids=["first-chunk", "middle-chunk"])
async def test_cut_chunk_resumes_where_it_stopped(
    fake: FakeRegistry, mirror: Mirror, cut_at: int
) -> None:
    data = random_bytes(MiB, 12)
    digest = fake.add_blob("team/app", data)
    fake.fault("cut", kind="blob", range_start=cut_at, after=10_000, times=1)

    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data

    ranges = [r.range for r in fake.requests(kind="blob")]
    assert ranges.count(f"bytes={cut_at}-{cut_at + CHUNK - 1}") == 1
    assert f"bytes={cut_at + 10_000}-{cut_at + CHUNK - 1}" in ranges  # not from its start
    assert fake.body_bytes("blob") == len(data)  # nothing fetched twice
    assert fake.download_sessions() == 1


async def test_a_stream_cut_again_and_again_still_completes(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    data = random_bytes(512 * KiB, 13)
    digest = fake.add_blob("team/app", data)
    fake.fault("cut", kind="blob", after=40_000)  # every response, every time

    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data
    # Every resumption starts exactly where the previous response stopped.
    for chunk_start in range(0, len(data), CHUNK):
        end = chunk_start + CHUNK - 1
        starts = sorted(
            r.range_start or 0
            for r in fake.requests(kind="blob")
            if r.range and r.range.endswith(f"-{end}")
        )
        assert starts == list(range(chunk_start, end, 40_000))
    assert fake.body_bytes("blob") == len(data)


async def wrong_bytes_forgotten(
    fake: FakeRegistry, mirror: Mirror, fault: Fault, digest: str, data: bytes
) -> None:
    """One fetch got the wrong bytes: nothing of it stays, and the next request starts afresh
    (this time the upstream sends the right bytes)."""
    assert fake.download_sessions() == 1
    assert mirror.metric("mirror_digest_mismatches_total", registry="fake.test") == 1
    await poll(lambda: mirror.blobs.in_flight == 0)
    assert not mirror.blob_file(digest).exists()
    fake.faults.remove(fault)
    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data
    assert fake.download_sessions() == 2


@pytest.mark.parametrize("threshold", [8 * MiB, 256 * KiB], ids=["single-request", "ranged"])
async def test_wrong_bytes_never_complete_and_are_not_cached(
    fake: FakeRegistry, make_mirror: MakeMirror, threshold: int
) -> None:
    # Larger than VERIFY_FIRST: its headers go out before its bytes can be checked.
    mirror = await make_mirror(ranged_threshold=threshold)
    size = 2 * MiB
    data = random_bytes(size, 14)
    digest = fake.add_blob("team/app", data)
    fault = fake.fault("wrong_bytes", kind="blob", position=size // 2)
    gate = fake.fault("hold", kind="blob", range_start=0, times=1)
    before = mirror.server_requests()

    # Raw sockets: how the body ends is the point. The bytes sent are wrong, so the end is a
    # reset: a short body ended by a FIN is one containerd resumes with Range, gluing a good
    # tail to this wrong prefix and failing its commit.
    path = f"{blob_url(digest)}?ns=fake.test"
    port = mirror.client.port
    ranges = [None, None, None, {"Range": "bytes=1000-"}, {"Range": f"bytes=0-{size // 2 + 10}"}]
    tasks = [asyncio.ensure_future(raw_get(port, path, r)) for r in ranges]
    await gate.reached.wait()
    await joined(mirror, before, len(ranges))
    gate.release()
    sent = bytearray(data)
    sent[size // 2] ^= 0xFF  # what the upstream sent
    for header, resp in zip(ranges, await asyncio.gather(*tasks), strict=True):
        assert resp.status == (206 if header else 200)  # headers left before the last byte came
        assert len(resp.body) < resp.content_length, "a wrong blob was delivered whole"
        assert resp.ended == "reset"  # never a clean end that invites a resume
        start = 1000 if header == {"Range": "bytes=1000-"} else 0
        assert resp.body == sent[start : start + len(resp.body)]
    await wrong_bytes_forgotten(fake, mirror, fault, digest, data)


async def test_a_small_blob_with_wrong_bytes_fails_before_its_headers(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    # A config-sized blob is checked before anything is sent: every waiting client gets an
    # error it can fall back from (containerd tries its next host), none a body to resume.
    data = random_bytes(40 * KiB, 15)
    digest = fake.add_blob("team/app", data)
    fault = fake.fault("wrong_bytes", kind="blob", position=100)
    gate = fake.fault("hold", kind="blob", times=1)
    before = mirror.server_requests()
    path = f"{blob_url(digest)}?ns=fake.test"
    ranges = [None, None, {"Range": "bytes=1000-"}]
    tasks = [asyncio.ensure_future(raw_get(mirror.client.port, path, r)) for r in ranges]
    await gate.reached.wait()
    await joined(mirror, before, len(ranges))
    gate.release()
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 502
        error = json.loads(resp.body)["errors"][0]
        assert error["detail"] == {"expected": digest, "actual": error["detail"]["actual"]}
        assert "did not match its digest" in error["message"]
    await wrong_bytes_forgotten(fake, mirror, fault, digest, data)


async def test_body_going_silent_is_resumed_after_the_read_timeout(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror(read_timeout=0.3)
    data = random_bytes(MiB, 19)
    digest = fake.add_blob("team/app", data)
    fake.fault("stall", kind="blob", range_start=2 * CHUNK, after=1000)  # stalls until teardown

    started = time.monotonic()
    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert await resp.read() == data
    assert time.monotonic() - started < 2.0
    ranges = [r.range for r in fake.requests(kind="blob")]
    assert f"bytes={2 * CHUNK + 1000}-{3 * CHUNK - 1}" in ranges


async def test_cold_blob_streams_while_it_downloads(fake: FakeRegistry, mirror: Mirror) -> None:
    """A client never waits for the whole download: the first bytes come at once."""
    data = random_bytes(MiB, 20)
    digest = fake.add_blob("team/app", data)
    fake.fault("slow_body", kind="blob", rate=512 * KiB)  # per upstream connection

    started = time.monotonic()
    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    first = await resp.content.readexactly(16 * KiB)
    first_byte = time.monotonic() - started
    rest = await resp.read()
    done = time.monotonic() - started
    assert first + rest == data
    assert first_byte < done / 4, (first_byte, done)
    # Four throttled streams in parallel: well under the 2 s one stream would take.
    assert done < 1.5, done
    assert fake.body_bytes("blob") == len(data)


async def test_range_request_joins_a_download_in_progress(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    data = random_bytes(MiB, 15)
    digest = fake.add_blob("team/app", data)
    stall = fake.fault("stall", kind="blob", range_start=0, after=16 * KiB)

    whole = await mirror.client.get(blob_url(digest), params=FAKE)
    assert whole.status == 200
    await stall.reached.wait()
    # A range inside the written prefix is answered while the download is stalled: every
    # byte but its last, which waits for the whole blob's verdict (a range cannot be
    # verified on its own, and a complete response must never be made of wrong bytes).
    inside = await mirror.client.get(
        blob_url(digest), params=FAKE, headers={"Range": "bytes=100-8099"}
    )
    assert inside.status == 206
    assert await asyncio.wait_for(inside.content.readexactly(7999), 10) == data[100:8099]
    assert mirror.blobs.in_flight == 1
    ranges = {"bytes=300000-700000": (300000, 700000), "bytes=1000-5000": (1000, 5000),
              f"bytes={len(data) - 10}-": (len(data) - 10, len(data) - 1)}  # fmt: skip
    parts = {}
    for header, (start, end) in ranges.items():
        resp = await mirror.client.get(blob_url(digest), params=FAKE, headers={"Range": header})
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
        assert resp.headers["Content-Length"] == str(end - start + 1)
        parts[header] = resp
    assert mirror.requests("blob", "coalesced") == 0  # counted once each request is done
    stall.release()
    assert await inside.read() == data[8099:8100]
    for header, (start, end) in ranges.items():
        assert await parts[header].read() == data[start : end + 1]
    assert await whole.read() == data
    assert fake.download_sessions() == 1
    await poll(lambda: mirror.requests("blob", "coalesced") == 4, what="the joins to be counted")


async def test_upstream_ignoring_range_is_one_stream(fake: FakeRegistry, mirror: Mirror) -> None:
    data = random_bytes(MiB, 16)
    digest = fake.add_blob("team/app", data)
    fake.fault("ignore_range", kind="blob")
    gate = fake.fault("hold", kind="blob", times=1)
    before = mirror.server_requests()

    async def client() -> bytes:
        resp = await mirror.client.get(blob_url(digest), params=FAKE)
        assert resp.status == 200
        return await resp.read()

    tasks = [asyncio.ensure_future(client()) for _ in range(3)]
    await gate.reached.wait()
    await joined(mirror, before, 3)
    gate.release()
    assert await asyncio.gather(*tasks) == [data] * 3
    assert fake.count(kind="blob", method="GET") == 1
    assert fake.requests(kind="blob")[0].status == 200
    assert fake.body_bytes("blob") == len(data)


async def test_slow_client_does_not_hold_back_a_fast_one(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror(chunk_size=MiB)
    data = random_bytes(32 * MiB, 17)  # far more than the socket buffers hold
    digest = fake.add_blob("team/app", data)
    gate = fake.fault("hold", kind="blob", range_start=0)
    before = mirror.server_requests()
    path = f"{blob_url(digest)}?ns=fake.test"

    # The slow one takes its headers, then reads nothing until the end of the test.
    slow_task = asyncio.ensure_future(stalled_client(mirror.client.port, path))
    await gate.reached.wait()
    await joined(mirror, before, 1)
    fast = asyncio.ensure_future(mirror.client.get(blob_url(digest), params=FAKE))
    await joined(mirror, before, 2)
    gate.release()
    _, slow_reader, slow_writer = await slow_task
    try:
        resp = await fast
        assert await resp.read() == data
        await wait_cached(mirror, digest)  # the download committed ...

        # ... while the slow client is still stuck: its request is not done.
        def done() -> float:
            return mirror.requests("blob", "miss") + mirror.requests("blob", "coalesced")

        await poll(lambda: done() >= 1, what="the fast request to be counted")
        assert done() == 1
        body, ended = await read_to_end(slow_reader)  # it resumes, and gets every byte
        assert (body, ended) == (data, "eof")
    finally:
        slow_writer.close()
    assert fake.download_sessions() == 1


async def test_manifest_by_digest_is_fetched_once_for_concurrent_clients(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    image = fake.add_image("team/app", "v1", [random_bytes(KiB, 18)])
    gate = fake.fault("hold", kind="manifest-digest")
    before = mirror.server_requests()

    async def client() -> bytes:
        resp = await mirror.client.get(f"/v2/team/app/manifests/{image.digest}", params=FAKE)
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image.digest
        return await resp.read()

    tasks = [asyncio.ensure_future(client()) for _ in range(20)]
    await gate.reached.wait()
    await joined(mirror, before, 20)
    gate.release()
    assert await asyncio.gather(*tasks) == [image.manifest] * 20
    assert fake.count(kind="manifest-digest", method="GET") == 1
    assert mirror.requests("manifest", "coalesced") == 19


async def test_empty_body_for_a_non_empty_digest_is_never_a_success(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    # An origin (or its CDN) answering 200 with no bytes: nothing to hold back, so the
    # verdict itself must come before the end of the response.
    digest = fake.add_blob("team/app", b"real content")
    fake.repos["team/app"].blobs[digest] = b""
    async with mirror.client.get(blob_url(digest), params=FAKE) as resp:
        body = b""
        failed = False
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError:
            failed = True
        assert failed or resp.status != 200, (resp.status, body)
    assert not mirror.blob_file(digest).exists()
