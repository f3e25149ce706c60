"""The blob download against upstreams that misbehave and a store that fails or is slow:
unreliable Range support, cuts, silence after a trickle, a commit that fails or is cut short by
a shutdown, and the bounds on what one blob may ask of the upstream."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.app import Deps, create_app
from mirror.config import Config
from mirror.oci.digest import Digest, parse_digest
from mirror.storage.blobstore import LocalWriter, StoreError
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.layout import Layout
from mirror.storage.local import CacheStore

from .clients import joined
from .conftest import MakeMirror
from .fakeregistry import FakeRegistry
from .harness import TEST_UPSTREAM, KiB, MiB, Mirror, mirror_config, poll, random_bytes, wait_cached

FAKE = {"ns": "fake.test"}
NAME = "team/app"
CHUNK = 64 * KiB  # the test config's upstream.chunk_size


def blob_url(digest: str) -> str:
    return f"/v2/{NAME}/blobs/{digest}"


def files_under(root: Path) -> list[str]:
    return sorted(
        str(Path(d, f).relative_to(root))
        for sub in ("tmp", "partial", "blobs")
        for d, _, files in os.walk(root / sub)
        for f in files
    )


async def start(aiohttp_client: Any, config: Config, store: CacheStore) -> Mirror:
    """The mirror on a store of the test's own."""
    app = create_app(config, Deps(store=store))
    return Mirror(await aiohttp_client(app), app, config)


class FailingCommits:
    """The filesystem store, but every commit fails after the bytes were verified (a disk
    that went away), at once: before any follower woken by the verdict has run."""

    def __init__(self, inner: FilesystemStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def create(self, **hints: Any) -> LocalWriter:
        writer = await self._inner.create(**hints)

        async def commit(digest: Digest) -> None:
            raise StoreError("injected: the cache disk failed")

        writer.commit = commit  # type: ignore[method-assign]  # this one writer's, not the class's
        return writer


class GatedFsync:
    """A disk whose sync waits for the test: a slow fsync, held in place in its thread."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.errors: list[BaseException] = []

    def __call__(self, fd: int) -> None:
        self.entered.set()
        self.go.wait(30)
        try:
            os.fsync(fd)
        except BaseException as exc:
            self.errors.append(exc)
            raise


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
    assert not mirror.blob_file(digest).exists()


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


async def test_concurrent_heads_of_an_uncached_blob_are_one_upstream_head(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    data = random_bytes(MiB, 65)
    digest = fake.add_blob(NAME, data)
    gate = fake.fault("hold", kind="blob", method="HEAD")
    before = mirror.server_requests()

    tasks = [
        asyncio.ensure_future(mirror.client.head(blob_url(digest), params=FAKE)) for _ in range(20)
    ]
    await gate.reached.wait()
    await joined(mirror, before, 20)
    gate.release()
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
    assert fake.count(kind="blob", method="HEAD") == 1
    assert fake.count(kind="blob", method="GET") == 0
    assert mirror.requests("blob", "miss") == 1
    assert mirror.requests("blob", "coalesced") == 19


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_repository_without_the_blob_does_not_fail_one_that_has_it(
    fake: FakeRegistry, mirror: Mirror, method: str
) -> None:
    """Shared by digest across repositories, a fetch started for one that lacks the blob (or
    that the mirror may not read) must not turn a pull of one that has it into a 404: skopeo
    fails the whole image on it."""
    data = random_bytes(MiB, 66)
    digest = fake.add_blob(NAME, data)
    gate = fake.fault("hold", kind="blob", method=method, times=1)
    before = mirror.server_requests()
    stranger = asyncio.ensure_future(
        mirror.client.request(method, f"/v2/other/repo/blobs/{digest}", params=FAKE)
    )
    await gate.reached.wait()
    owner = asyncio.ensure_future(mirror.client.request(method, blob_url(digest), params=FAKE))
    await joined(mirror, before, 2)
    gate.release()

    assert (await stranger).status == 404
    resp = await owner
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    if method == "GET":
        assert await resp.read() == data
    first, *rest = [r.name for r in fake.requests(kind="blob", method=method)]
    assert first == "other/repo"
    assert rest and set(rest) == {NAME}  # its own fetch (in ranged pieces, for a GET)


async def test_a_failure_not_about_the_repository_is_not_tried_again_for_each(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    """Only a failure that may be the other repository's alone (404, 401, 403) is worth a try
    of one's own: an outage or a bad request would fail it the same way (a 400 stands in
    here: a 5xx is retried inside the download first)."""
    digest = fake.add_blob(NAME, random_bytes(MiB, 67))
    fake.add_blob("other/repo", random_bytes(MiB, 67))
    gate = fake.fault("hold", kind="blob", times=1)
    fake.fault("status", kind="blob", status=400, code="DENIED_BY_POLICY")
    before = mirror.server_requests()
    first = asyncio.ensure_future(mirror.client.get(f"/v2/other/repo/blobs/{digest}", params=FAKE))
    await gate.reached.wait()
    joiner = asyncio.ensure_future(mirror.client.get(blob_url(digest), params=FAKE))
    await joined(mirror, before, 2)
    gate.release()
    assert (await first).status == (await joiner).status
    assert {r.name for r in fake.requests(kind="blob")} == {"other/repo"}


# -- the commit and shutdown -------------------------------------------------------------------


async def test_a_failed_commit_lets_readers_finish_the_verified_bytes(
    fake: FakeRegistry, aiohttp_client: Any, tmp_path: Path
) -> None:
    config = mirror_config(tmp_path / "cache", fake.url)
    store = FailingCommits(FilesystemStore(Layout(config.cache.directory)))
    mirror = await start(aiohttp_client, config, store)  # type: ignore[arg-type]
    data = random_bytes(MiB, 66)
    digest = fake.add_blob(NAME, data)
    gate = fake.fault("hold", kind="blob", range_start=0)
    before = mirror.server_requests()

    async def get(headers: dict[str, str]) -> bytes:
        resp = await mirror.client.get(blob_url(digest), params=FAKE, headers=headers)
        return await resp.read()

    # Every reader holds its last byte back until the verdict, so each is still streaming
    # when the commit fails right after the verification.
    tasks = [asyncio.ensure_future(get(h)) for h in ({}, {"Range": "bytes=1000-"})]
    await gate.reached.wait()
    await joined(mirror, before, len(tasks))
    gate.release()
    assert await asyncio.gather(*tasks) == [data, data[1000:]]
    await poll(lambda: mirror.blobs.in_flight == 0, what="the download to end")
    assert await mirror.blobs.cached_size(parse_digest(digest)) is None  # the commit did fail
    assert files_under(config.cache.directory) == []


async def test_shutdown_during_the_commit_waits_for_its_thread(
    fake: FakeRegistry, aiohttp_client: Any, tmp_path: Path
) -> None:
    config = mirror_config(tmp_path / "cache", fake.url)
    disk = GatedFsync()
    mirror = await start(
        aiohttp_client, config, FilesystemStore(Layout(config.cache.directory), disk)
    )
    data = random_bytes(300 * KiB, 67)
    digest = fake.add_blob(NAME, data)

    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    assert await resp.read() == data  # verified: the client is done while the commit runs
    assert await asyncio.to_thread(disk.entered.wait, 10)
    closing = asyncio.ensure_future(mirror.client.close())  # cancels the download
    await asyncio.sleep(0.1)  # not needed for the outcome: it lets the cancel arrive first
    disk.go.set()
    await closing
    # The thread never saw its descriptor closed or its file unlinked under it: the commit
    # finished, and what it left is whole.
    assert disk.errors == []
    hexd = digest.removeprefix("sha256:")
    assert files_under(config.cache.directory) == [f"blobs/sha256/{hexd[:2]}/{hexd}"]
    assert Layout(config.cache.directory).blob(parse_digest(digest)).read_bytes() == data


async def test_a_shutdown_mid_download_keeps_the_prefix_for_the_next_fill(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    """A rolling update must not cost the bytes already fetched: what is contiguous from byte
    0 stays under partial/ (never visible as a blob), and the next fill goes on from there."""
    mirror = await make_mirror()
    cache = mirror.config.cache.directory
    data = random_bytes(2 * MiB, 68)
    digest = fake.add_blob(NAME, data)
    stall = fake.fault("stall", kind="blob", range_start=8 * CHUNK, after=8 * KiB)

    resp = await mirror.client.get(blob_url(digest), params=FAKE)
    got = await resp.content.readexactly(100 * KiB)
    await stall.reached.wait()
    await mirror.client.close()
    with pytest.raises(aiohttp.ClientError):
        got += await resp.read()
    assert got == data[: len(got)]
    hexd = digest.removeprefix("sha256:")
    assert files_under(cache) == [f"partial/{hexd}", f"partial/{hexd}.prefix"]
    kept = int((cache / "partial" / f"{hexd}.prefix").read_text())
    assert kept >= 8 * CHUNK  # every piece before the stalled one

    fake.faults.remove(stall)
    fake.reset_log()
    again = await make_mirror(config=mirror.config)
    resp = await again.client.get(blob_url(digest), params=FAKE)
    assert await resp.read() == data  # checked whole: the kept bytes were hashed too
    starts = [r.range_start for r in fake.requests(kind="blob")]
    assert starts and min(s for s in starts if s is not None) >= kept, starts
    await wait_cached(again, digest)
    assert files_under(cache) == [f"blobs/sha256/{hexd[:2]}/{hexd}"]
