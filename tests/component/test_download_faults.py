"""The blob download against upstreams that misbehave: unreliable Range support, cuts, silence
after a trickle, and the bounds on what one blob may ask of the upstream."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from mirror.oci.digest import parse_digest

from .conftest import MakeMirror
from .fakeregistry import FakeRegistry
from .harness import TEST_UPSTREAM, KiB, MiB, Mirror, poll, random_bytes, wait_cached

FAKE = {"ns": "fake.test"}
NAME = "team/app"
CHUNK = 64 * KiB  # the test config's upstream.chunk_size


def blob_url(digest: str) -> str:
    return f"/v2/{NAME}/blobs/{digest}"


# -- upstreams with unreliable Range support ---------------------------------------------------


def cut_without_range(fake: FakeRegistry, seed: int, times: int | None) -> tuple[bytes, str]:
    """A blob whose upstream ignores Range and cuts the body at byte 300000 (`times` times)."""
    data = random_bytes(MiB, seed)
    digest = fake.add_blob(NAME, data)
    fake.fault("ignore_range", kind="blob")
    fake.fault("cut", kind="blob", after=300_000, times=times)
    return data, digest


async def test_ignoring_range_and_cut_mid_body_restarts_and_skips_what_is_written(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    data, digest = cut_without_range(fake, 60, times=1)
    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data
    await wait_cached(mirror, digest)
    gets = fake.requests(kind="blob", method="GET")
    assert [r.status for r in gets] == [200, 200]  # the whole blob, twice: no Range support
    assert gets[1].range == f"bytes=300000-{len(data) - 1}"  # asked from where it stopped


async def test_ignoring_range_and_cut_every_time_fails_after_bounded_retries(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    # Every retry is cut where the first answer was: past what is written, never.
    _, digest = cut_without_range(fake, 61, times=None)
    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await poll(lambda: mirror.blobs.in_flight == 0)
    assert fake.count(kind="blob", method="GET") == 1 + TEST_UPSTREAM.retries
    assert mirror.blobs.cached(parse_digest(digest)) is None


async def test_range_honoured_only_at_byte_0_falls_back_to_one_stream(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    data = random_bytes(MiB, 62)
    digest = fake.add_blob(NAME, data)
    fake.fault("first_range_only", kind="blob")

    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data
    await wait_cached(mirror, digest)
    gets = fake.requests(kind="blob", method="GET")
    assert gets[0].status == 206
    # The first response, at most one more request per stream (each stopped at the first
    # 200), then one stream from where the written prefix ended: not a retry storm.
    assert len(gets) <= 1 + TEST_UPSTREAM.ranged_streams + 1
    last = gets[-1]
    assert last.status == 200
    assert last.range is not None and last.range.endswith(f"-{len(data) - 1}")
    assert last.range_start is not None and last.range_start <= CHUNK


# -- readers and the upstream's pace -----------------------------------------------------------


async def test_bytes_that_landed_reach_readers_while_the_upstream_is_silent(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    # A long read timeout: nothing but the mirror's own wake-ups can deliver the trickle.
    mirror = await make_mirror(read_timeout=60.0)
    data = random_bytes(MiB, 63)
    digest = fake.add_blob(NAME, data)
    landed = 20_000
    fake.fault("drip", kind="blob", range_start=0, rate=1000, delay=0.002)
    stall = fake.fault("stall", kind="blob", range_start=0, after=landed)

    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    await stall.reached.wait()
    first = await asyncio.wait_for(resp.content.readexactly(landed), 10)
    assert mirror.blobs.in_flight == 1  # still stalled: no later upstream write woke anyone
    stall.release()
    assert first + await resp.read() == data


@pytest.mark.parametrize("streams", [1, 4])
async def test_ranged_streams_bounds_the_concurrent_upstream_streams(
    fake: FakeRegistry, make_mirror: MakeMirror, streams: int
) -> None:
    mirror = await make_mirror(ranged_streams=streams)
    data = random_bytes(MiB, 64)
    digest = fake.add_blob(NAME, data)
    fake.fault("slow_body", kind="blob", rate=MiB)  # every piece long enough to overlap

    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert await resp.read() == data
    # The first response's stream is one of them, not one more.
    assert fake.peak_blob_streams == streams
    assert fake.body_bytes("blob") == len(data)
