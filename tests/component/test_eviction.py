"""A bounded cache: least recently used blobs go first once the high watermark is passed, a blob
being sent is never evicted, `mirror cache status|gc` see and trim the same cache, and access
history survives a restart (and a lost index costs history, never consistency)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from mirror.config import Config
from mirror.keys import janitor_key, manifests_key, store_key
from mirror.oci.digest import Digest, parse_digest
from mirror.storage.layout import Layout
from mirror.storage.lock import CacheLock

from .conftest import MakeMirror
from .fakeregistry import FakeRegistry, Image
from .harness import KiB, MiB, Mirror, mirror_config, poll, random_bytes, wait_cached

FAKE = {"ns": "fake.test"}
NAME = "team/app"
REPO_ROOT = Path(__file__).resolve().parents[2]

Blob = tuple[str, bytes]  # (digest, bytes)


def config(tmp_path: Path, fake: FakeRegistry, **cache: Any) -> Config:
    # 1 MiB pieces: fewer Range requests per blob, the same download path.
    base = mirror_config(tmp_path / "cache", fake.url, chunk_size=MiB)
    return replace(base, cache=replace(base.cache, **cache))


def blobs(fake: FakeRegistry, count: int, size: int) -> list[Blob]:
    out = []
    for i in range(count):
        data = random_bytes(size, 100 + i)
        out.append((fake.add_blob(NAME, data), data))
    return out


def blob_file(mirror: Mirror, blob: Blob) -> Path:
    return mirror.blob_file(blob[0])


def cached(mirror: Mirror, blob: Blob) -> bool:
    """Looks at the file only: asking the service would count as an access."""
    return blob_file(mirror, blob).exists()


def disk_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in (cache_dir / "blobs").rglob("*") if p.is_file())


async def get(mirror: Mirror, blob: Blob) -> None:
    resp = await mirror.client.get(f"/v2/{NAME}/blobs/{blob[0]}", params=FAKE)
    assert resp.status == 200
    assert await resp.read() == blob[1]
    # The file is renamed into place a moment before the cache accounts for it: wait for both,
    # or a size check can see the file and not yet its bytes in the index.
    await poll(
        lambda: cached(mirror, blob) and mirror.blobs.progress(parse_digest(blob[0])) is None,
        what="blob committed and accounted",
    )


async def run_cli(*args: str) -> tuple[int, str, str]:
    """`mirror cache ...` in a process of its own: (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "cache", *args,
        cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def mirror_cli(*args: str) -> str:
    status, out, err = await run_cli(*args)
    assert status == 0, err
    return out


def status_numbers(text: str) -> tuple[int, int]:
    """(bytes, entries) from `mirror cache status`."""
    size = re.search(r"^size\s+.*\((\d+) bytes\)", text, re.M)
    entries = re.search(r"^entries\s+(\d+)$", text, re.M)
    assert size and entries, text
    return int(size.group(1)), int(entries.group(1))


def garble_index(root: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    (root / "index.sqlite").write_bytes(b"not a database" * 100)


async def test_least_recently_used_blobs_are_evicted_first(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    cap = 3 * MiB  # high watermark 2.7 MiB, low 1.8 MiB
    cfg = config(tmp_path, fake, max_size=cap, high_watermark=0.9, low_watermark=0.6)
    mirror = await make_mirror(config=cfg)
    a, b, c, d = blobs(fake, 4, 800 * KiB)
    for blob in (a, b, c):  # 2.34 MiB: under the high watermark
        await get(mirror, blob)
    await get(mirror, a)  # a cache hit makes `a` the most recently used
    # Counted once the handler returns, which can be a moment after the client has it all.
    await poll(lambda: mirror.requests("blob", "hit") == 1, what="the hit to be counted")
    assert mirror.metric("mirror_cache_evictions_total") == 0

    await get(mirror, d)  # 3.1 MiB: over the high watermark, the janitor wakes
    await poll(lambda: mirror.metric("mirror_cache_evictions_total") > 0, what="an eviction")
    assert [cached(mirror, x) for x in (a, b, c, d)] == [True, False, False, True]
    assert disk_bytes(cfg.cache.directory) == 2 * 800 * KiB <= cap * 0.6
    assert mirror.metric("mirror_cache_evictions_total") == 2
    assert mirror.metric("mirror_cache_evicted_bytes_total") == 2 * 800 * KiB
    assert mirror.metric("mirror_cache_bytes") == 2 * 800 * KiB

    fake.reset_log()
    await get(mirror, a)
    assert fake.log == []  # kept: served from disk
    await get(mirror, b)
    assert fake.download_sessions() == 1  # evicted: fetched again


async def test_cache_stays_under_its_cap(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    cap = 3 * MiB
    cfg = config(tmp_path, fake, max_size=cap, high_watermark=0.9, low_watermark=0.6)
    mirror = await make_mirror(config=cfg)
    pulled = blobs(fake, 10, 600 * KiB)  # 5.9 MiB through a 3 MiB cache
    for blob in pulled:
        await get(mirror, blob)
    await mirror.app[janitor_key].collect()  # whatever the background round has not done yet
    assert disk_bytes(cfg.cache.directory) <= cap * 0.9
    assert mirror.metric("mirror_cache_bytes") == disk_bytes(cfg.cache.directory)
    kept = [cached(mirror, blob) for blob in pulled]
    assert kept == sorted(kept)  # only the oldest went: survivors are the most recent pulls
    assert sum(kept) >= 3


async def test_a_blob_being_sent_is_not_evicted(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    mirror = await make_mirror(config=config(tmp_path, fake))
    big, other = blobs(fake, 2, 8 * MiB)
    for blob in (big, other):
        await get(mirror, blob)
    sent_before = mirror.metric("mirror_served_bytes_total", source="disk")

    # A slow client: a small receive buffer, and it stops reading after 64 KiB.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", mirror.client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(
            f"GET /v2/{NAME}/blobs/{big[0]}?ns=fake.test HTTP/1.1\r\n"
            "Host: mirror\r\nConnection: close\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        body = await reader.readexactly(64 * KiB)
        await asyncio.sleep(0.2)
        # Still mid-transfer: the bytes of a cached blob are counted once it is all sent.
        assert mirror.metric("mirror_served_bytes_total", source="disk") == sent_before

        evicted, _ = await mirror.app[janitor_key].collect(target=0)
        assert evicted == 1
        assert cached(mirror, big)  # pinned while being read
        assert not cached(mirror, other)
        assert mirror.metric("mirror_served_bytes_total", source="disk") == sent_before

        body += await asyncio.wait_for(reader.readexactly(len(big[1]) - len(body)), 10)
        assert hashlib.sha256(body).hexdigest() == big[0].removeprefix("sha256:")
    finally:
        writer.close()
    await poll(
        lambda: mirror.metric("mirror_served_bytes_total", source="disk") > sent_before,
        what="the transfer to finish",
    )
    assert await mirror.app[janitor_key].collect(target=0) == (1, len(big[1]))
    assert not cached(mirror, big)  # once read, it is an ordinary candidate


async def test_access_order_survives_a_restart(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    cfg = config(tmp_path, fake)
    first = await make_mirror(config=cfg)
    a, b, c = blobs(fake, 3, 300 * KiB)
    for blob in (a, b, c, a):  # a: written first (oldest mtime), used last
        await get(first, blob)
    await first.client.close()  # a clean stop flushes the index

    second = await make_mirror(config=cfg)
    assert second.metric("mirror_cache_bytes") == 3 * 300 * KiB
    assert second.metric("mirror_cache_entries") == 3
    # From file times alone `a` would go first; the remembered access keeps it.
    assert await second.app[janitor_key].collect(target=300 * KiB) == (2, 2 * 300 * KiB)
    assert [cached(second, x) for x in (a, b, c)] == [True, False, False]


async def test_a_lost_index_is_rebuilt_from_the_tree(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """A crash can leave the index behind the tree or garbled: the files are the truth."""
    cfg = config(tmp_path, fake)
    first = await make_mirror(config=cfg)
    a, b, c = blobs(fake, 3, 200 * KiB)
    for blob in (a, b, c):
        await get(first, blob)
    await first.client.close()
    root = cfg.cache.directory
    blob_file(first, c).unlink()  # gone behind the index's back
    garble_index(root)

    second = await make_mirror(config=cfg)
    assert second.metric("mirror_cache_bytes") == 2 * 200 * KiB
    assert second.metric("mirror_cache_entries") == 2
    fake.reset_log()
    for blob in (a, b):
        await get(second, blob)
    assert fake.log == []
    await get(second, c)
    assert fake.download_sessions() == 1
    assert status_numbers(await mirror_cli("status", "--cache-dir", str(root))) == (
        3 * 200 * KiB,
        3,
    )


async def test_cache_cli_status_and_gc(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    cfg = config(tmp_path, fake)
    root = str(cfg.cache.directory)
    mirror = await make_mirror(config=cfg)
    a, b, c = blobs(fake, 3, 500 * KiB)
    for blob in (a, b, c, a):  # b is now the least recently used
        await get(mirror, blob)
    await mirror.client.close()

    status = await mirror_cli("status", "--cache-dir", root)
    assert status_numbers(status) == (3 * 500 * KiB, 3)
    assert "1.5 MiB" in status
    assert "cap unbounded" in status

    out = await mirror_cli("gc", "--cache-dir", root, "--target", str(3 * 500 * KiB - 1))
    assert out.strip() == "evicted 1 blobs, 500.0 KiB; now 1000.0 KiB"
    assert [cached(mirror, x) for x in (a, b, c)] == [True, False, True]
    assert status_numbers(await mirror_cli("status", "--cache-dir", root)) == (2 * 500 * KiB, 2)

    out = await mirror_cli("gc", "--cache-dir", root, "--target", "600KiB")
    assert out.startswith("evicted 1 blobs")
    assert [cached(mirror, x) for x in (a, b, c)] == [True, False, False]

    # The server, restarted on what the CLI left, agrees and refetches only what is gone.
    again = await make_mirror(config=cfg)
    assert again.metric("mirror_cache_bytes") == 500 * KiB
    fake.reset_log()
    await get(again, a)
    assert fake.log == []
    await get(again, b)
    assert fake.download_sessions() == 1


def index_matches_disk(mirror: Mirror, cache_dir: Path) -> None:
    files = [p for p in (cache_dir / "blobs").rglob("*") if p.is_file()]
    assert mirror.metric("mirror_cache_bytes") == sum(p.stat().st_size for p in files)
    assert mirror.metric("mirror_cache_entries") == len(files)


async def test_an_evicted_manifest_is_fetched_again_not_resurrected(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """A manifest still in memory after its file was evicted was served from there, and the
    access put it back in the index: bytes counted that no file holds, never written again."""
    cfg = config(tmp_path, fake)
    mirror = await make_mirror(config=cfg)
    image = fake.add_image(NAME, "v1", [random_bytes(50 * KiB, 3)])
    resp = await mirror.client.get(f"/v2/{NAME}/manifests/v1", params=FAKE)
    assert await resp.read() == image.manifest
    await mirror.app[janitor_key].collect(target=0)
    index_matches_disk(mirror, cfg.cache.directory)
    assert mirror.app[manifests_key].peek_digest(parse_digest(image.digest), frozenset()) is None

    fake.reset_log()
    for ref in (image.digest, "v1", image.digest):
        resp = await mirror.client.get(f"/v2/{NAME}/manifests/{ref}", params=FAKE)
        assert await resp.read() == image.manifest
    assert fake.count("manifest-digest", "GET") == 1  # the tag is fresh: no GET by tag
    assert fake.count("manifest-tag", "GET") == 0
    stored = await mirror.app[store_key].read_manifest(parse_digest(image.digest))
    assert stored is not None and stored[0] == image.manifest
    index_matches_disk(mirror, cfg.cache.directory)


async def test_a_blob_larger_than_the_cap_evicts_nothing_else(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Least recently used order would take every other blob and then the big one itself: an
    empty cache, for a blob that can never fit. It stays, over the cap, until it is the least
    recently used and something newer needs its room."""
    cap = 3 * MiB  # high watermark 2.7 MiB, low 1.8 MiB
    cfg = config(tmp_path, fake, max_size=cap, high_watermark=0.9, low_watermark=0.6)
    mirror = await make_mirror(config=cfg)
    janitor = mirror.app[janitor_key]
    small = blobs(fake, 3, 500 * KiB)
    huge = (fake.add_blob(NAME, data := random_bytes(4 * MiB, 99)), data)
    for blob in small:
        await get(mirror, blob)
    with capture_logs() as logs:
        await get(mirror, huge)
        assert await janitor.collect() == (0, 0)  # the round the commit woke, whenever it runs
    assert [cached(mirror, x) for x in (*small, huge)] == [True] * 4
    assert mirror.metric("mirror_cache_evictions_total") == 0
    assert [e["bytes"] for e in logs if e["event"] == "blob_exceeds_cache_cap"] == [4 * MiB]

    newer = blobs(fake, 4, 500 * KiB)[3]
    await get(mirror, newer)
    await janitor.collect()
    # The big blob, now older than `newer`, goes; and of the rest only what the low watermark
    # still needs: the oldest.
    assert [cached(mirror, x) for x in (*small, huge, newer)] == [False, True, True, False, True]
    index_matches_disk(mirror, cfg.cache.directory)


async def test_a_blob_over_the_low_watermark_evicts_only_what_the_cap_needs(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """The low watermark cannot be reached without the blob just stored; the cap can."""
    cfg = config(tmp_path, fake, max_size=3 * MiB, high_watermark=0.9, low_watermark=0.6)
    mirror = await make_mirror(config=cfg)
    small = blobs(fake, 3, 500 * KiB)
    big = (fake.add_blob(NAME, data := random_bytes(2200 * KiB, 98)), data)  # 1.8 < it < 2.7 MiB
    for blob in (*small, big):
        await get(mirror, blob)
    await mirror.app[janitor_key].collect()
    assert [cached(mirror, x) for x in (*small, big)] == [False, False, True, True]
    assert disk_bytes(cfg.cache.directory) <= 3 * MiB * 0.9
    assert mirror.metric("mirror_cache_evictions_total") == 2


async def test_evictions_count_only_files_deleted(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """A victim a request pins while the round runs is skipped, and one whose file is already
    gone frees nothing: neither is an eviction."""
    cfg = config(tmp_path, fake)
    mirror = await make_mirror(config=cfg)
    janitor = mirror.app[janitor_key]
    a, b, c, d = blobs(fake, 4, 100 * KiB)
    for blob in (a, b, c, d):
        await get(mirror, blob)
    blob_file(mirror, c).unlink()  # gone behind the index's back
    with contextlib.ExitStack() as pins:

        def pin_b(digest: Digest) -> None:  # a request opens b just as a goes
            if str(digest) == a[0]:
                pins.enter_context(janitor.pinned(parse_digest(b[0])))

        janitor.on_evicted(pin_b)
        assert await janitor.collect(target=0) == (2, 2 * 100 * KiB)  # a and d
    assert [cached(mirror, x) for x in (a, b, c, d)] == [False, True, False, False]
    assert mirror.metric("mirror_cache_evictions_total") == 2
    assert mirror.metric("mirror_cache_evicted_bytes_total") == 2 * 100 * KiB
    index_matches_disk(mirror, cfg.cache.directory)


def index_rows(root: Path) -> list[tuple[str, int, float]]:
    with sqlite3.connect(root / "index.sqlite") as db:
        return sorted(db.execute("SELECT key, size, last_access FROM blobs").fetchall())


async def test_cache_cli_beside_a_running_server(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """gc beside a server would delete blobs it is sending, on access times up to a flush
    interval old, and leave its size gauges wrong: it is refused. status only reads."""
    cfg = config(tmp_path, fake)
    root = cfg.cache.directory
    mirror = await make_mirror(config=cfg)
    a, b = blobs(fake, 2, 100 * KiB)
    for blob in (a, b):
        await get(mirror, blob)
    await mirror.client.close()
    blob_file(mirror, b).unlink()  # the index still remembers it
    rows = index_rows(root)

    with CacheLock(Layout(root)):  # what the server holds while it runs
        status, out, err = await run_cli("gc", "--cache-dir", str(root), "--target", "0")
        assert status == 1
        assert f"in use by process {os.getpid()}" in err
        assert "cache.max_size" in err
        assert cached(mirror, a)

        out = await mirror_cli("status", "--cache-dir", str(root))
        assert status_numbers(out) == (100 * KiB, 1)  # from the tree, as always
        assert re.search(rf"^server\s+running \(pid {os.getpid()}\).*lag", out, re.M), out
        assert index_rows(root) == rows  # the server's index: read, never corrected

    # Stopped: gc runs, and status says nothing of a server.
    assert (await mirror_cli("gc", "--cache-dir", str(root), "--target", "0")).startswith(
        "evicted 1 blobs"
    )
    assert not cached(mirror, a)
    assert "server" not in await mirror_cli("status", "--cache-dir", str(root))


async def pull(mirror: Mirror, image: Image) -> None:
    resp = await mirror.client.get(f"/v2/{image.name}/manifests/{image.tag}", params=FAKE)
    assert await resp.read() == image.manifest
    for digest in (image.config, *image.layers):
        resp = await mirror.client.get(f"/v2/{image.name}/blobs/{digest}", params=FAKE)
        assert resp.status == 200
        await resp.read()
        await wait_cached(mirror, digest)


async def test_a_shared_layer_is_one_file_counted_once(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    cfg = config(tmp_path, fake)
    mirror = await make_mirror(config=cfg)
    base = random_bytes(300 * KiB, 1)
    one = fake.add_image(NAME, "one", [base, random_bytes(100 * KiB, 2)])
    two = fake.add_image(NAME, "two", [base, random_bytes(100 * KiB, 3)])
    assert one.layers[0] == two.layers[0]
    for image in (one, two):
        await pull(mirror, image)
    sizes = {one.digest: len(one.manifest), two.digest: len(two.manifest)}
    for image in (one, two):
        for digest in (image.config, *image.layers):
            sizes[digest] = mirror.blob_file(digest).stat().st_size
    assert len(sizes) == 6  # two manifests, one config and one base layer shared, two layers
    assert mirror.metric("mirror_cache_entries") == 6
    assert mirror.metric("mirror_cache_bytes") == sum(sizes.values())
    index_matches_disk(mirror, cfg.cache.directory)


async def test_manifests_count_toward_the_cap(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """A manifest is a file under blobs/ like any other: counted, and evicted in its turn."""
    cfg = config(tmp_path, fake)
    mirror = await make_mirror(config=cfg)
    image = fake.add_image(NAME, "v1", [random_bytes(100 * KiB, 4)])
    await pull(mirror, image)
    layer = mirror.blob_file(image.layers[0]).stat().st_size
    config_size = mirror.blob_file(image.config).stat().st_size
    total = len(image.manifest) + config_size + layer
    assert mirror.metric("mirror_cache_bytes") == total
    assert mirror.metric("mirror_cache_entries") == 3

    # The manifest was used first: it is the least recently used, and goes first.
    assert await mirror.app[janitor_key].collect(target=total - 1) == (1, len(image.manifest))
    assert not blob_file(mirror, (image.digest, image.manifest)).exists()
    fake.reset_log()
    resp = await mirror.client.get(f"/v2/{NAME}/manifests/v1", params=FAKE)
    assert await resp.read() == image.manifest
    assert fake.count("manifest-digest", "GET") == 1  # fetched again, and stored again
    assert mirror.metric("mirror_cache_bytes") == total
    index_matches_disk(mirror, cfg.cache.directory)
