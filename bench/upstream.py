"""Upstream: a real Distribution registry (Debian `docker-registry`) filled with generated images.

Images are pushed through the registry's own HTTP API (POST + PUT for small blobs, POST +
PATCH... + PUT for big ones), so no skopeo or docker is needed. Layers are random bytes:
incompressible, so no layer of the stack can win by compressing, and the digests differ
each run, so no cache can be warm by accident.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import aiohttp

from .procs import Process, http_status, require_binary

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
UPLOAD_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path  # a copy on local disk: the source of the push and of nginx static serving

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class Image:
    name: str  # repository, e.g. perf/big
    tag: str
    manifest: bytes
    digest: str
    media_type: str
    config: Blob
    layers: tuple[Blob, ...]


class Registry:
    """A docker-registry process storing on the filesystem under `root`, plain HTTP, no auth.

    With `proxy` (a registry URL) it is Distribution's pull-through cache of that registry.
    """

    def __init__(self, root: Path, port: int, log: Path, proxy: str | None = None) -> None:
        self.root = root
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = root / "config.yml"
        root.mkdir(parents=True, exist_ok=True)
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            # A fixed secret only silences the "generated a random secret" warning.
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench-not-a-secret\n"
            + (f"proxy:\n  remoteurl: {proxy}\n" if proxy else "")
        )
        binary = require_binary("docker-registry", "docker-registry")
        self.process = Process("docker-registry", [binary, "serve", str(config)], log)

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(lambda: http_status(self.url + "/v2/") == 200)

    def stop(self) -> None:
        self.process.stop()

    def fresh(self) -> None:
        """Restart on empty storage: a cold cache, as a fresh mirror cache dir is."""
        self.stop()
        shutil.rmtree(self.root / "data", ignore_errors=True)
        self.start()

    @property
    def pid(self) -> int:
        return self.process.pid


def write_random_file(path: Path, size: int) -> str:
    """Fill `path` with `size` random bytes; returns the sha256 digest."""
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        for _ in range(size // (8 << 20) + 2):  # bounded: one pass per 8 MiB piece
            if left <= 0:
                break
            piece = os.urandom(min(left, 8 << 20))
            h.update(piece)
            f.write(piece)
            left -= len(piece)
    return "sha256:" + h.hexdigest()


def blob_from_bytes(path: Path, data: bytes) -> Blob:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), path)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


async def push_blob(session: aiohttp.ClientSession, base: str, name: str, blob: Blob) -> None:
    """Upload one blob: monolithic PUT when small, PATCH chunks then PUT when large."""
    async with session.post(f"{base}/v2/{name}/blobs/uploads/") as resp:
        if resp.status != 202:
            raise RuntimeError(f"upload start for {name}: {resp.status} {await resp.text()}")
        location = urljoin(base + "/", resp.headers["Location"])
    sep = "&" if "?" in location else "?"
    if blob.size <= UPLOAD_CHUNK:
        body = await asyncio.to_thread(blob.path.read_bytes)
        async with session.put(
            f"{location}{sep}digest={blob.digest}",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            if resp.status != 201:
                raise RuntimeError(f"blob PUT {blob.digest}: {resp.status} {await resp.text()}")
        return
    for offset in range(0, blob.size, UPLOAD_CHUNK):  # bounded: one PATCH per chunk
        chunk = await asyncio.to_thread(_read_at, blob.path, offset, UPLOAD_CHUNK)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        }
        async with session.patch(location, data=chunk, headers=headers) as resp:
            if resp.status != 202:
                raise RuntimeError(f"blob PATCH at {offset}: {resp.status} {await resp.text()}")
            location = urljoin(base + "/", resp.headers["Location"])
    sep = "&" if "?" in location else "?"
    async with session.put(f"{location}{sep}digest={blob.digest}") as resp:
        if resp.status != 201:
            raise RuntimeError(f"blob PUT {blob.digest}: {resp.status} {await resp.text()}")


async def make_layers(
    name: str, sizes: list[int], work: Path, blobs_dir: Path, write: Callable[[Path, int], str]
) -> list[Blob]:
    """Write one layer per size with `write(path, size) -> digest`, each moved to
    `blobs_dir`/<digest> once complete."""
    layers = []
    for i, size in enumerate(sizes):
        tmp = work / f"{name.replace('/', '_')}-layer{i}.tmp"
        digest = await asyncio.to_thread(write, tmp, size)
        final = blobs_dir / digest
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        layers.append(Blob(digest, final.stat().st_size, final))
    return layers


def config_blob(layers: list[Blob], blobs_dir: Path) -> Blob:
    """The image config for `layers` (their digests as diff_ids: the layers are uncompressed)."""
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]},
        "config": {},
    }
    data = json.dumps(doc, sort_keys=True).encode()
    return blob_from_bytes(blobs_dir / ("sha256:" + hashlib.sha256(data).hexdigest()), data)


def manifest_bytes(config: Blob, layers: list[Blob]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": b.digest, "size": b.size} for b in layers
            ],
        },
        indent=3,  # registries serve whatever bytes were pushed; indent like real tools do
    ).encode()


async def push_manifest(
    session: aiohttp.ClientSession, base: str, name: str, ref: str, body: bytes, media_type: str
) -> str:
    """PUT one manifest (by tag or digest); returns its digest, checked against the registry's."""
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    async with session.put(
        f"{base}/v2/{name}/manifests/{ref}", data=body, headers={"Content-Type": media_type}
    ) as resp:
        if resp.status != 201:
            raise RuntimeError(f"manifest PUT {name}:{ref}: {resp.status} {await resp.text()}")
        if resp.headers.get("Docker-Content-Digest") != digest:
            raise RuntimeError("registry computed a different manifest digest")
    return digest


def write_static_manifest(static_root: Path, name: str, refs: list[str], body: bytes) -> None:
    """Lay a manifest out as /v2/<name>/manifests/<ref> files for nginx static."""
    manifests_dir = static_root / "v2" / name / "manifests"
    manifests_dir.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (manifests_dir / ref).write_bytes(body)


async def push_image(
    base: str, name: str, tag: str, layer_sizes: list[int], work: Path, static_root: Path
) -> Image:
    """Generate and push one single-platform OCI image; keep its bytes for nginx static.

    `static_root` receives /v2/<name>/blobs/<digest> and /v2/<name>/manifests/<ref> files,
    laid out so nginx can serve the same URLs as a registry straight from disk.
    """
    blobs_dir = static_root / "v2" / name / "blobs"
    layers = await make_layers(name, layer_sizes, work, blobs_dir, write_random_file)
    config = config_blob(layers, blobs_dir)
    manifest = manifest_bytes(config, layers)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for blob in (*layers, config):
            await push_blob(session, base, name, blob)
        manifest_digest = await push_manifest(session, base, name, tag, manifest, OCI_MANIFEST)
    write_static_manifest(static_root, name, [tag, manifest_digest], manifest)
    return Image(name, tag, manifest, manifest_digest, OCI_MANIFEST, config, tuple(layers))
