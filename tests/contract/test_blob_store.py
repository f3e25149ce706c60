"""The contract every blob store keeps, whatever keeps the bytes: the local disk, its in-memory
twin and the region's bucket (moto's S3). Parametrized over every store (conftest.py); a new
level joins by adding itself to the `store` fixture."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.oci.digest import Digest
from mirror.storage.blobstore import BlobStore, FileSpan, LocalStore, NoSpace, OpenBlob, Segment
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.layout import Layout
from mirror.storage.memory import MemoryStore
from mirror.storage.metastore import ManifestStore, TagRecord
from mirror.storage.s3 import S3Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def materialize(segments: AsyncIterator[Segment]) -> bytes:
    """What a client would receive: a FileSpan is read here as the kernel would send it."""
    out = bytearray()
    async for segment in segments:
        if isinstance(segment, FileSpan):
            out += os.pread(segment.fd, segment.count, segment.offset)
        else:
            out += segment
    return bytes(out)


async def write(store: BlobStore, data: bytes, piece: int = 7) -> Digest:
    """Written out of order, as ranged streams do, then committed."""
    writer = await store.create()
    offsets = list(range(0, len(data), piece))
    for offset in reversed(offsets):
        await writer.write(offset, data[offset : offset + piece])
    digest = digest_of(data)
    await writer.commit(digest)
    return digest


async def test_a_missing_blob_is_not_there(store: BlobStore) -> None:
    absent = digest_of(b"never written")
    assert await store.stat(absent) is None
    assert await store.open(absent) is None
    assert await store.remove(absent) is None


async def test_written_out_of_order_reads_back_whole(store: BlobStore) -> None:
    data = os.urandom(1000)
    digest = await write(store, data)
    assert await store.stat(digest) == len(data)
    blob = await store.open(digest)
    assert blob is not None
    try:
        assert blob.size == len(data)
        assert await materialize(blob.read(0, len(data))) == data
        assert await materialize(blob.read(123, 456)) == data[123:456]
        assert await materialize(blob.read(10, 10)) == b""
    finally:
        blob.close()


async def test_nothing_is_visible_before_commit(store: BlobStore) -> None:
    data = b"a blob being written"
    digest = digest_of(data)
    writer = await store.create()
    await writer.write(0, data)
    assert await store.stat(digest) is None
    assert await store.open(digest) is None
    await writer.commit(digest)
    assert await store.stat(digest) == len(data)


async def test_a_discarded_write_leaves_nothing(store: BlobStore) -> None:
    data = b"abandoned half-way"
    writer = await store.create()
    await writer.write(0, data)
    await writer.discard()
    await writer.discard()  # idempotent: the cleanup paths may both get there
    assert await store.stat(digest_of(data)) is None


async def test_an_empty_blob(store: BlobStore) -> None:
    writer = await store.create()
    digest = digest_of(b"")
    await writer.commit(digest)
    assert await store.stat(digest) == 0
    blob = await store.open(digest)
    assert blob is not None
    assert await materialize(blob.read(0, 0)) == b""
    blob.close()


async def test_an_open_blob_stays_readable_after_remove(store: BlobStore) -> None:
    """Local eviction may delete a blob a client is still being sent. (Not the bucket's
    promise: the mirror never removes from it, its lifecycle rule does, days later.)"""
    if isinstance(store, S3Store):
        pytest.skip("a bucket object is gone once deleted; the mirror never deletes from it")
    data = os.urandom(300)
    digest = await write(store, data)
    blob: OpenBlob | None = await store.open(digest)
    assert blob is not None
    assert await store.remove(digest) == len(data)
    assert await store.stat(digest) is None
    assert await materialize(blob.read(0, len(data))) == data
    blob.close()


async def test_manifests_round_trip_with_their_media_type(store: BlobStore) -> None:
    meta: ManifestStore = store  # type: ignore[assignment]  # every level keeps manifests
    body = b'{"schemaVersion": 2}'
    digest = digest_of(body)
    assert await meta.read_manifest(digest) is None
    await meta.write_manifest(digest, body, OCI_MANIFEST)
    assert await meta.read_manifest(digest) == (body, OCI_MANIFEST)
    assert await store.remove(digest) == len(body)
    assert await meta.read_manifest(digest) is None


async def test_a_large_blob_in_parts(store: BlobStore) -> None:
    """Past the S3 level's multipart threshold (6 MiB here), in pieces of any size."""
    data = os.urandom(13 * 1024 * 1024 + 17)
    writer = await store.create(size=len(data), digest=digest_of(data))
    for offset in range(0, len(data), 1024 * 1024):
        await writer.write(offset, data[offset : offset + 1024 * 1024])
    await writer.commit(digest_of(data))
    assert await store.stat(digest_of(data)) == len(data)
    blob = await store.open(digest_of(data))
    assert blob is not None
    assert await materialize(blob.read(5_000_000, 12_000_000)) == data[5_000_000:12_000_000]
    blob.close()


async def test_tags_round_trip_locally(tmp_path: Path) -> None:
    """Tags are each replica's own (revalidated by a HEAD, which costs the origin nothing)."""
    record = TagRecord("sha256:" + "a" * 64, OCI_MANIFEST, 20, 1.5)
    fs = FilesystemStore(Layout(tmp_path / "fs"))
    fs.prepare()
    for meta in (fs, MemoryStore()):
        assert await meta.read_tag("r.example", "team/app", "v1") is None
        await meta.write_tag("r.example", "team/app", "v1", record)
        assert await meta.read_tag("r.example", "team/app", "v1") == record


async def test_a_followed_fill_shows_what_was_written(tmp_path: Path) -> None:
    """Local levels only: followers read the written prefix, also after the commit renamed it."""
    fs = FilesystemStore(Layout(tmp_path / "fs"))
    fs.prepare()
    local: list[LocalStore] = [fs, MemoryStore()]
    for store in local:
        writer = await store.create()
        view = writer.view()
        await writer.write(0, b"hello ")
        assert view.pread(0, 6) == b"hello "
        await writer.write(6, b"world")
        await writer.commit(digest_of(b"hello world"))
        assert writer.committed
        assert view.pread(0, 11) == b"hello world"
        view.close()


async def test_a_full_store_says_so(tmp_path: Path) -> None:
    store = MemoryStore(capacity=10)
    writer = await store.create()
    await writer.write(0, b"0123456789")
    with pytest.raises(NoSpace):
        await writer.write(10, b"x")
