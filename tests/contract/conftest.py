"""The stores under contract, each made fresh per test; S3 is moto's server over real HTTP."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiobotocore.config import AioConfig
from component.aws import aws_session
from component.moto import PART_MIN, MotoServer

from mirror.aws import LazyClient
from mirror.storage.blobstore import BlobStore
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.layout import Layout
from mirror.storage.memory import MemoryStore
from mirror.storage.s3 import S3Settings, S3Store

MiB = 1024 * 1024
# Small enough that a test blob of a few MiB goes up in parts (moto here takes parts of
# PART_MIN; S3's own smallest is 5 MiB).
S3_SETTINGS = dict(prefix="mirror/", multipart_threshold=6 * MiB, part_size=PART_MIN * 4)


async def s3_store(moto: MotoServer) -> AsyncIterator[S3Store]:
    """A store on a bucket of its own, so tests never see each other's objects."""
    client = LazyClient(
        aws_session(), "s3", "us-east-1", moto.url, AioConfig(retries={"total_max_attempts": 1})
    )
    bucket = f"contract-{secrets.token_hex(4)}"
    await (await client.get()).create_bucket(Bucket=bucket)
    try:
        yield S3Store(client, S3Settings(bucket=bucket, **S3_SETTINGS))  # type: ignore[arg-type]
    finally:
        await client.close()


@pytest.fixture(params=["filesystem", "memory", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "filesystem":
        fs = FilesystemStore(Layout(tmp_path / "store"))
        fs.prepare()
        yield fs
    elif request.param == "memory":
        yield MemoryStore()
    else:
        async for s3 in s3_store(request.getfixturevalue("moto_server")):
            yield s3
