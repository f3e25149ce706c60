"""Crash consistency with the real process: kill -9 in the middle of a large blob download
leaves nothing partial in the cache, the restart sweeps tmp/, and a lost access index is
rebuilt from the tree without costing the upstream a single request."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .clients import Skopeo
from .images import Catalog, Image, seed_large
from .mirror_proc import Mirror, MirrorFactory, mirror_cli
from .procs import CommandFailed, wait_until
from .test_pull import assert_same_image
from .upstream import Upstream

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
LARGE = "library/large"
LARGE_SIZE = 48 * MiB  # above upstream.ranged_threshold (32MiB): fetched as 3 Range requests


@pytest.fixture(scope="module")
def large_image(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """library/large:1.0, one linux/amd64 manifest with a single 48 MiB layer."""
    return seed_large(upstream.registry_host, tmp_path_factory.mktemp("large"), LARGE, LARGE_SIZE)


# ----- what is on disk -------------------------------------------------------------------


def blob_files(cache_dir: Path) -> dict[str, Path]:
    """name -> path of every file under blobs/ (whatever its depth or name)."""
    root = cache_dir / "blobs"
    return {p.name: p for p in root.rglob("*") if p.is_file()}


def tree_truth(cache_dir: Path) -> dict[str, int]:
    """hex digest -> size of every blob really in the cache, each checked against its name."""
    truth = {}
    for name, path in blob_files(cache_dir).items():
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == name, f"{path}: content does not match name"
        assert path.parent.name == name[:2] and path.parent.parent.name == "sha256", path
        truth[name] = len(data)
    return truth


def tmp_entries(cache_dir: Path) -> list[str]:
    tmp = cache_dir / "tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


def cache_status(cache_dir: Path) -> tuple[int, int]:
    """(entries, bytes) as `mirror cache status` reports them."""
    result = mirror_cli("cache", "status", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    entries = re.search(r"^entries\s+(\d+)$", result.stdout, re.M)
    size = re.search(r"^size\s+.*\((\d+) bytes\)", result.stdout, re.M)
    assert entries and size, f"unexpected `mirror cache status` output:\n{result.stdout}"
    return int(entries[1]), int(size[1])


def index_rows(cache_dir: Path) -> dict[str, int]:
    """key -> size as the mirror's own index.sqlite holds them (read-only, never created)."""
    db = sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT key, size FROM blobs").fetchall())
    finally:
        db.close()


def assert_status_matches_tree(cache_dir: Path) -> dict[str, int]:
    truth = tree_truth(cache_dir)
    assert cache_status(cache_dir) == (len(truth), sum(truth.values()))
    return truth


def layer_size(image: Image) -> int:
    size: int = json.loads(image.platform("linux/amd64").raw)["layers"][0]["size"]
    return size


def last_start(mirror: Mirror) -> dict[str, object]:
    starts = [line for line in mirror.log_lines() if line.get("event") == "mirror_started"]
    assert starts, "the mirror logged no mirror_started line"
    return starts[-1]


# ----- tests -----------------------------------------------------------------------------


def test_kill_9_mid_download_shows_nothing_partial_and_the_restart_goes_on_from_the_prefix(
    mirror_factory: MirrorFactory, large_image: Image, skopeo: Skopeo, upstream: Upstream
) -> None:
    mirror = mirror_factory()
    cache = mirror.cache_dir
    layer = large_image.platform("linux/amd64").layers[0]
    layer_hex = layer.removeprefix("sha256:")
    note = cache / "partial" / f"{layer_hex}.prefix"
    # About 2 MiB/s per Range stream: the first MiB lands within a second, the whole layer
    # would take ~8 s, so the kill certainly falls in the middle.
    upstream.set_faults(
        {"action": "throttle", "kind": "blob", "repository": LARGE, "rate": 2 * MiB}
    )
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    with ThreadPoolExecutor(1) as pool:
        copy = pool.submit(skopeo.copy, conf, f"docker.io/{LARGE}:1.0", transport="dir")
        # The fill has noted a contiguous prefix (every 4 MiB): what a restart goes on from.
        wait_until(lambda: note.exists() or copy.done(), timeout=20, what="a noted prefix")
        assert not copy.done(), "the copy finished before the kill: the throttle did not hold"
        mirror.kill()
        with pytest.raises(CommandFailed):
            copy.result(timeout=30)

    # Nothing of the layer anywhere under blobs/; the crash left its partial fill.
    assert layer_hex not in blob_files(cache), "a partial layer is visible under blobs/"
    assert not (cache / "blobs" / "sha256" / layer_hex[:2] / layer_hex).exists()
    kept = int(note.read_text())
    assert 0 < kept < layer_size(large_image)
    # Every file that is there is whole (it hashes to its name), and even before a restart the
    # CLI counts only those, not the partial fill.
    assert_status_matches_tree(cache)

    upstream.clear_faults()
    mirror.start()  # same port, same cache directory
    assert tmp_entries(cache) == [], "tmp/ was not swept at start"
    assert (cache / "partial" / layer_hex).exists(), "the restart threw the partial fill away"
    # The server reconciled its index with the tree at start (the CLI would rescan it anyway,
    # so look at the server's own rows first).
    assert index_rows(cache) == tree_truth(cache)
    assert_status_matches_tree(cache)

    upstream.reset()
    # dir: keeps the uncompressed layer as it is (oci: would gzip it, changing the digests).
    layout = skopeo.copy(conf, f"docker.io/{LARGE}:1.0", transport="dir")
    assert layout.root_digest == large_image.digest
    assert layout.blobs[large_image.digest] == large_image.raw
    assert set(large_image.platform("linux/amd64").blobs) <= set(layout.blobs)  # hashes checked
    fetched = [r for r in upstream.requests() if r.kind == "blob" and r.path.endswith(layer)]
    assert fetched, "the rest of the layer was not fetched after the crash"
    # Only what was not kept crossed again (the kept prefix was hashed and checked with it).
    assert sum(r.sent for r in fetched) <= layer_size(large_image) - kept
    assert any(line.get("event") == "fill_resumed" for line in mirror.log_lines())

    # Committed whole, partial and temp files gone, the index agrees with the tree.
    wait_until(lambda: not note.exists(), timeout=5, what="the partial fill to be committed")
    assert tmp_entries(cache) == []
    truth = assert_status_matches_tree(cache)
    assert truth[layer_hex] == layer_size(large_image)


def test_lost_index_is_rebuilt_from_the_tree(
    mirror: Mirror, catalog: Catalog, skopeo: Skopeo, upstream: Upstream
) -> None:
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    skopeo.copy(conf, "docker.io/library/hello:1.0", all_platforms=True)
    truth = assert_status_matches_tree(mirror.cache_dir)
    assert mirror.stop() == 0

    index = mirror.cache_dir / "index.sqlite"
    assert index.exists()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)

    mirror.start()
    # The server itself rebuilt the index at start (before any CLI could rescan the tree).
    assert index_rows(mirror.cache_dir) == truth
    assert cache_status(mirror.cache_dir) == (len(truth), sum(truth.values()))

    upstream.reset()
    layout = skopeo.copy(conf, "docker.io/library/hello:1.0", all_platforms=True)
    assert_same_image(layout, catalog.hello, ["linux/amd64", "linux/arm64"])
    assert upstream.counts()[("GET", "blob")] == 0
    assert upstream.requests() == [], [str(r) for r in upstream.requests()]
    assert tree_truth(mirror.cache_dir) == truth


def test_one_server_per_cache_directory(mirror: Mirror, skopeo: Skopeo, catalog: Catalog) -> None:
    """A second server on the same directory would sweep the first one's temp files at start;
    `mirror cache gc` beside a server would delete what it is sending. Both are refused;
    `mirror cache status` only reads, so it is allowed."""
    conf = skopeo.registries_conf("docker.io", mirror=f"{mirror.host}/docker.io")
    skopeo.copy(conf, "docker.io/library/hello:1.0", all_platforms=True)
    truth = tree_truth(mirror.cache_dir)
    pid = mirror.process.proc.pid if mirror.process.proc else None

    second = mirror_cli("serve", "--config", str(mirror.config_path), "--listen", "127.0.0.1:0")
    assert second.returncode == 1
    assert f"{mirror.cache_dir} is in use by process {pid}" in second.stderr

    gc = mirror_cli("cache", "gc", "--cache-dir", str(mirror.cache_dir), "--target", "0")
    assert gc.returncode == 1
    assert "cache.max_size" in gc.stderr
    assert tree_truth(mirror.cache_dir) == truth

    status = mirror_cli("cache", "status", "--cache-dir", str(mirror.cache_dir))
    assert status.returncode == 0
    assert f"running (pid {pid})" in status.stdout

    assert mirror.stop() == 0
    gc = mirror_cli("cache", "gc", "--cache-dir", str(mirror.cache_dir), "--target", "0")
    assert gc.returncode == 0, gc.stderr
    assert tree_truth(mirror.cache_dir) == {}
