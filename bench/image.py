"""The scale-out image: one platform's OCI manifest behind an index, layers of random tar data.

Layers are real (uncompressed) tar archives holding one file of random bytes: incompressible
like the GPU images of the brief, new every run, and still something containerd can unpack,
so real `ctr` nodes pull exactly what the simulated nodes pull.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .upstream import (
    OCI_MANIFEST,
    Blob,
    Image,
    config_blob,
    make_layers,
    manifest_bytes,
    push_blob,
    push_manifest,
    write_static_manifest,
)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MIB = 1 << 20


@dataclass(frozen=True)
class IndexedImage:
    name: str
    tag: str
    index: bytes
    index_digest: str
    image: Image  # the linux/amd64 manifest the index points at, its config and layers

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.image.config, *self.image.layers)

    @property
    def total_bytes(self) -> int:
        """Everything one node downloads: index, manifest, config and layers."""
        return len(self.index) + len(self.image.manifest) + sum(b.size for b in self.blobs)


def layer_sizes(total: int, count: int) -> list[int]:
    """Split `total` bytes into `count` layers, largest first (weights count..1), as real
    images have a big base layer and smaller ones on top; whole MiB where possible."""
    if count < 1 or total < count:
        raise ValueError(f"cannot split {total} bytes into {count} layers")
    weights = list(range(count, 0, -1))
    unit = MIB if total >= count * MIB else 1
    sizes = [max(unit, total * w // sum(weights) // unit * unit) for w in weights]
    sizes[0] += total - sum(sizes)  # the remainder goes to the base layer
    return sizes


class _RandomReader:
    """A file-like source of `size` random bytes, for tarfile to copy from."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def write_tar_layer(path: Path, size: int) -> str:
    """A tar of one random file, about `size` bytes in all; returns the archive's sha256."""
    payload = max(0, size - 3 * 512 - 10240)  # header, end blocks, record padding
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("data.bin")
        info.size, info.mode, info.mtime = payload, 0o644, 0
        tar.addfile(info, _RandomReader(payload))  # type: ignore[arg-type]  # read() suffices
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for _ in range(path.stat().st_size // (8 * MIB) + 2):  # bounded: one pass per piece
            piece = f.read(8 * MIB)
            if not piece:
                break
            h.update(piece)
    return "sha256:" + h.hexdigest()


def index_bytes(manifest: bytes, digest: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        },
        indent=3,
    ).encode()


async def push_indexed_image(
    base: str, name: str, tag: str, sizes: list[int], work: Path, static_root: Path
) -> IndexedImage:
    """Generate the layers, push blobs, the manifest by digest and the index under `tag`;
    lay every piece out under `static_root` for nginx static (the floor)."""
    blobs_dir = static_root / "v2" / name / "blobs"
    layers = await make_layers(name, sizes, work, blobs_dir, write_tar_layer)
    config = config_blob(layers, blobs_dir)
    manifest = manifest_bytes(config, layers)
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = index_bytes(manifest, manifest_digest)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        for blob in (*layers, config):
            await push_blob(session, base, name, blob)
        await push_manifest(session, base, name, manifest_digest, manifest, OCI_MANIFEST)
        index_digest = await push_manifest(session, base, name, tag, index, OCI_INDEX)
    write_static_manifest(static_root, name, [manifest_digest], manifest)
    write_static_manifest(static_root, name, [tag, index_digest], index)
    image = Image(name, tag, manifest, manifest_digest, OCI_MANIFEST, config, tuple(layers))
    return IndexedImage(name, tag, index, index_digest, image)
