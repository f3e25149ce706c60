"""A full cache disk never fails a pull: the blob is passed through whole and verified, nothing
is left in tmp/, the failure is counted, and the next request tries to cache it again.

The cache directory is a real 8 MiB tmpfs (the tests run as root), so ENOSPC comes from the
kernel, at whatever offset the concurrent Range writers happen to reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MakeMirror
from .fakeregistry import FakeRegistry
from .harness import MiB, Mirror, mirror_config, poll, random_bytes

FAKE = {"ns": "fake.test"}
NAME = "team/app"
DISK = 8 * MiB


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // MiB}m", "tmpfs", str(where)],
                   check=True)  # fmt: skip
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", DISK) as where:
        yield where


@pytest.fixture
async def disk_mirror(small_disk: Path, fake: FakeRegistry, make_mirror: MakeMirror) -> Mirror:
    """Set up after the mount, so torn down (every file closed) before the unmount."""
    return await make_mirror(config=mirror_config(small_disk / "cache", fake.url, chunk_size=MiB))


async def enospc_count(mirror: Mirror) -> float:
    resp = await mirror.client.get("/metrics")
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name == "mirror_cache_write_failures_total" and sample.labels == {
                "reason": "enospc"
            }:
                return sample.value
    return 0.0  # the series appears with its first failure


def cache_dir(mirror: Mirror) -> Path:
    return mirror.config.cache.directory


def temp_files(mirror: Mirror) -> list[Path]:
    return list((cache_dir(mirror) / "tmp").iterdir())


def is_cached(mirror: Mirror, digest: str) -> bool:
    return mirror.blob_file(digest).exists()


async def fetch(mirror: Mirror, digest: str) -> bytes:
    resp = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
    assert resp.status == 200
    body = await resp.read()
    assert resp.headers["Content-Length"] == str(len(body))
    return body


@pytest.mark.parametrize("clients", [1, 3])
async def test_blob_larger_than_the_disk_is_passed_through_whole(
    fake: FakeRegistry, disk_mirror: Mirror, clients: int
) -> None:
    mirror = disk_mirror
    data = random_bytes(DISK + 4 * MiB, 7)
    digest = fake.add_blob(NAME, data)

    bodies = await asyncio.gather(*(fetch(mirror, digest) for _ in range(clients)))
    for body in bodies:
        assert len(body) == len(data)
        assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    await poll(lambda: temp_files(mirror) == [], what="tmp/ to empty")
    assert not is_cached(mirror, digest)
    assert await enospc_count(mirror) == 1
    assert fake.download_sessions() == 1  # the clients shared one download

    # Nothing was cached, so the next request goes upstream and tries caching again.
    assert await fetch(mirror, digest) == data
    assert fake.download_sessions() == 2
    await poll(lambda: temp_files(mirror) == [], what="tmp/ to empty")
    assert await enospc_count(mirror) == 2
    assert not is_cached(mirror, digest)


async def test_blob_that_fits_still_caches_after_a_pass_through(
    fake: FakeRegistry, disk_mirror: Mirror
) -> None:
    mirror = disk_mirror
    big = random_bytes(DISK + 2 * MiB, 8)
    small = random_bytes(2 * MiB, 9)
    big_digest = fake.add_blob(NAME, big)
    small_digest = fake.add_blob(NAME, small)

    assert await fetch(mirror, big_digest) == big
    await poll(lambda: temp_files(mirror) == [], what="tmp/ to empty")
    assert await fetch(mirror, small_digest) == small
    await poll(lambda: is_cached(mirror, small_digest), what="small blob committed")
    assert temp_files(mirror) == []
    assert await enospc_count(mirror) == 1
    fake.reset_log()
    assert await fetch(mirror, small_digest) == small
    assert fake.log == []
    # Counted once the handler returns, which can be a moment after the client has it all.
    await poll(lambda: mirror.requests("blob", "hit") == 1, what="the hit to be counted")


async def test_pass_through_from_an_upstream_without_range_support(
    fake: FakeRegistry, disk_mirror: Mirror
) -> None:
    mirror = disk_mirror
    fake.fault("ignore_range")
    data = random_bytes(DISK + 2 * MiB, 10)
    digest = fake.add_blob(NAME, data)
    resp = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data


def fill(where: Path) -> None:
    """Another tenant of the volume takes every free byte."""
    with open(where / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


async def test_disk_already_full_passes_blobs_through_from_the_first_byte(
    fake: FakeRegistry, disk_mirror: Mirror, small_disk: Path
) -> None:
    mirror = disk_mirror
    data = random_bytes(3 * MiB, 11)
    digest = fake.add_blob(NAME, data)
    fill(small_disk)
    assert await fetch(mirror, digest) == data
    await poll(lambda: temp_files(mirror) == [], what="tmp/ to empty")
    assert not is_cached(mirror, digest)
    assert await enospc_count(mirror) == 1


async def test_disk_already_full_still_serves_manifests(
    fake: FakeRegistry, disk_mirror: Mirror, small_disk: Path
) -> None:
    mirror = disk_mirror
    image = fake.add_image(NAME, "v1", [random_bytes(64 * 1024, 12)])
    fill(small_disk)
    for ref in ("v1", image.digest, image.digest):
        resp = await mirror.client.get(f"/v2/{NAME}/manifests/{ref}", params=FAKE)
        assert resp.status == 200, await resp.text()
        assert await resp.read() == image.manifest
    # Served from memory: no file, so nothing for the cache to count (or one day to evict).
    assert not is_cached(mirror, image.digest)
    assert mirror.metric("mirror_cache_entries") == mirror.metric("mirror_cache_bytes") == 0


async def test_writers_hitting_a_full_disk_together_evict_once(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """The ranged streams of one download reach the end of the disk at about the same moment.
    The first to ask makes the room; the others find it made, rather than each evicting again
    and emptying the cache for one blob."""
    layer = 16 * MiB
    with tmpfs(tmp_path / "disk", 160 * MiB) as disk:
        mirror = await make_mirror(
            config=mirror_config(disk / "cache", fake.url, chunk_size=layer, ranged_streams=4)
        )
        old = [fake.add_blob(NAME, random_bytes(layer, 20 + i)) for i in range(8)]  # 128 MiB
        for digest in old:
            await fetch(mirror, digest)
            await poll(lambda d=digest: is_cached(mirror, d), what="old layer committed")
        big = random_bytes(4 * layer, 30)  # a 64 MiB layer with about 30 MiB free
        big_digest = fake.add_blob(NAME, big)
        assert await fetch(mirror, big_digest) == big
        await poll(lambda: is_cached(mirror, big_digest), what="the big layer committed")

        # One round frees the least recently used down to the blob's need, floored at 64 MiB:
        # four old layers. A second round would have taken the other four too.
        assert [is_cached(mirror, d) for d in old] == [False] * 4 + [True] * 4
        assert mirror.metric("mirror_cache_evictions_total") == 4
        assert await enospc_count(mirror) == 0  # made room: nothing was passed through
        await mirror.client.close()  # every file closed before the unmount
