"""The region's bucket as the second level, on moto's S3 over real HTTP: what one replica
fetched, another (or the same one with an empty disk) serves with no blob byte from the
origin; redirects hand nodes a presigned URL; a bucket that is down or holds wrong bytes never
fails a pull or serves a wrong byte."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.config import AioConfig

from mirror.app import Deps, create_app
from mirror.aws import LazyClient
from mirror.config import Config, S3Config

from .aws import aws_session
from .clients import raw_get
from .fakeregistry import FakeRegistry, Image
from .harness import KiB, MiB, Mirror, closed_port, mirror_config, poll, random_bytes, wait_cached
from .moto import PART_MIN, MotoServer

FAKE = {"ns": "fake.test"}
NAME = "team/app"
LAYER = 2 * MiB + 5


@pytest.fixture
async def bucket(moto: MotoServer) -> AsyncIterator[str]:
    client = LazyClient(aws_session(), "s3", "us-east-1", moto.url, AioConfig())
    name = f"mirror-{secrets.token_hex(4)}"
    await (await client.get()).create_bucket(Bucket=name)
    try:
        yield name
    finally:
        await client.close()


@pytest.fixture
async def s3(moto: MotoServer) -> AsyncIterator[Any]:
    """A plain S3 client of the test's own, to look at (and spoil) the bucket."""
    client = LazyClient(aws_session(), "s3", "us-east-1", moto.url, AioConfig())
    try:
        yield await client.get()
    finally:
        await client.close()


def s3_config(
    tmp: Path, fake: FakeRegistry, bucket: str, endpoint: str, name: str, **s3: Any
) -> Config:
    base = mirror_config(tmp / name, fake.url)
    level = S3Config(
        bucket=bucket, region="us-east-1", endpoint_url=endpoint, prefix="mirror/",
        multipart_threshold=768 * KiB, part_size=PART_MIN, **s3,
    )  # fmt: skip
    return replace(base, s3=level)


async def replica(aiohttp_client: Any, config: Config) -> Mirror:
    app = create_app(config, Deps(aws_session=aws_session()))
    return Mirror(await aiohttp_client(app), app, config)


async def pull(mirror: Mirror, image: Image) -> None:
    """The manifest by digest (as containerd asks once it knows the tag's digest), the tag,
    then the config and every layer."""
    for ref in (image.digest, image.tag):
        resp = await mirror.client.get(f"/v2/{NAME}/manifests/{ref}", params=FAKE)
        assert resp.status == 200
    for digest in (image.config, *image.layers):
        resp = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
        body = await resp.read()
        assert resp.status == 200, body
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


async def uploaded(mirror: Mirror, count: int) -> None:
    await poll(
        lambda: (
            mirror.metric("mirror_s3_uploads_total", result="done")
            + mirror.metric("mirror_s3_uploads_total", result="skipped")
            >= count
        ),
        within=20,
        what=f"{count} uploads",
    )


def image_of(fake: FakeRegistry, seed: int) -> Image:
    # One layer above the multipart threshold (768 KiB here): it goes up in parts.
    layers = [random_bytes(LAYER, seed), random_bytes(300_000, seed + 1)]
    return fake.add_image(NAME, "v1", layers)


async def test_a_second_replica_serves_what_the_first_uploaded_with_no_origin_blob_bytes(
    fake: FakeRegistry, moto: MotoServer, bucket: str, s3: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    image = image_of(fake, 1)
    a = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "a"))
    await pull(a, image)
    await uploaded(a, 3)  # the config and both layers
    wanted = {key_of(d) for d in (image.digest, image.config, *image.layers)}
    await poll_bucket(s3, bucket, wanted)  # the manifest goes up in the background too

    fake.reset_log()
    b = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "b"))
    await pull(b, image)
    assert fake.body_bytes("blob") == 0  # every blob byte came from the bucket
    assert fake.count("manifest-digest", "GET") == 0  # the manifest by digest did too
    # Counted as each response ends, a moment after the client has its last byte.
    await poll(
        lambda: b.metric("mirror_served_bytes_total", source="s3") == blob_bytes(fake, image),
        what="every blob byte counted as served from s3",
    )
    # Filled from the bucket: nothing to upload again.
    assert b.metric("mirror_s3_uploads_total", result="queued") == 0


def key_of(digest: str) -> str:
    return f"mirror/blobs/sha256/{digest.removeprefix('sha256:')}"


def blob_bytes(fake: FakeRegistry, image: Image) -> int:
    return sum(len(fake.repos[NAME].blobs[d]) for d in (image.config, *image.layers))


async def poll_bucket(s3: Any, bucket: str, keys: set[str]) -> None:
    for _ in range(400):
        listed = await s3.list_objects_v2(Bucket=bucket)
        if keys <= {o["Key"] for o in listed.get("Contents", [])}:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not in the bucket: {keys}")


async def test_a_replica_restarted_on_an_empty_disk_fetches_nothing_from_the_origin_again(
    fake: FakeRegistry, moto: MotoServer, bucket: str, aiohttp_client: Any, tmp_path: Path
) -> None:
    image = image_of(fake, 3)
    first = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "one"))
    await pull(first, image)
    await uploaded(first, 3)
    await first.client.close()
    fake.reset_log()
    again = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "fresh"))
    await pull(again, image)
    assert fake.body_bytes("blob") == 0


async def test_redirects_send_nodes_to_the_bucket_for_blobs_only(
    fake: FakeRegistry, moto: MotoServer, bucket: str, aiohttp_client: Any, tmp_path: Path
) -> None:
    image = image_of(fake, 5)
    a = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "a"))
    await pull(a, image)
    await uploaded(a, 3)
    cfg = s3_config(tmp_path, fake, bucket, moto.url, "b", redirect=True)
    b = await replica(aiohttp_client, cfg)
    layer = image.layers[0]
    # Not yet known to be in the bucket (b never saw it there): served, never redirected.
    resp = await b.client.get(f"/v2/{NAME}/blobs/{layer}", params=FAKE, allow_redirects=False)
    assert resp.status == 200
    await resp.read()
    # Now it is known: a 307 to a presigned URL, which a client follows without credentials.
    resp = await b.client.get(f"/v2/{NAME}/blobs/{layer}", params=FAKE, allow_redirects=False)
    assert resp.status == 307
    location = resp.headers["Location"]
    assert location.startswith(moto.url) and "Signature" in location
    async with aiohttp.ClientSession() as plain:
        async with plain.get(location) as got:
            assert got.status == 200
            assert "sha256:" + hashlib.sha256(await got.read()).hexdigest() == layer
        async with plain.get(location, headers={"Range": "bytes=100-199"}) as got:
            assert got.status == 206
            assert len(await got.read()) == 100
    served = b.metric("mirror_served_bytes_total", source="disk")
    ranged = await b.client.get(
        f"/v2/{NAME}/blobs/{layer}", params=FAKE, headers={"Range": "bytes=5-9"},
        allow_redirects=False,
    )  # fmt: skip
    assert ranged.status == 307  # a Range is redirected too: S3 honours it
    assert b.metric("mirror_served_bytes_total", source="disk") == served
    assert b.metric("mirror_served_bytes_total", source="redirect") == LAYER + 5
    # HEAD is answered here, with the real length and digest; manifests are never redirected.
    head = await b.client.head(f"/v2/{NAME}/blobs/{layer}", params=FAKE, allow_redirects=False)
    assert (head.status, head.headers["Content-Length"]) == (200, str(LAYER))
    manifest = await b.client.get(
        f"/v2/{NAME}/manifests/{image.digest}", params=FAKE, allow_redirects=False
    )
    assert manifest.status == 200 and await manifest.read() == image.manifest


async def test_a_bucket_that_is_down_never_fails_a_pull(
    fake: FakeRegistry, aiohttp_client: Any, tmp_path: Path
) -> None:
    image = image_of(fake, 7)
    down = f"http://127.0.0.1:{closed_port()}"
    mirror = await replica(aiohttp_client, s3_config(tmp_path, fake, "gone", down, "a"))
    await pull(mirror, image)
    assert fake.body_bytes("blob") == blob_bytes(fake, image)
    assert mirror.metric("mirror_s3_requests_total", operation="head_object", result="error") >= 1


async def test_wrong_bytes_in_the_bucket_are_never_a_success_and_are_replaced(
    fake: FakeRegistry, moto: MotoServer, bucket: str, s3: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    data = random_bytes(MiB, 9)
    digest = fake.add_blob(NAME, data)
    key = key_of(digest)
    spoiled = bytearray(data)
    spoiled[MiB // 2] ^= 0xFF
    await s3.put_object(Bucket=bucket, Key=key, Body=bytes(spoiled))
    mirror = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "a"))

    resp = await raw_get(mirror.client.port, f"/v2/{NAME}/blobs/{digest}?ns=fake.test")
    assert resp.status == 200
    assert len(resp.body) < MiB, "a wrong blob was delivered whole"
    assert resp.ended == "reset"
    await poll(lambda: mirror.blobs.in_flight == 0, what="the failed fill to end")

    got = await mirror.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE)
    assert await got.read() == data  # from the origin this time
    await wait_cached(mirror, digest)
    await poll(lambda: mirror.metric("mirror_s3_uploads_total", result="done") >= 1, within=20)
    stored = await s3.get_object(Bucket=bucket, Key=key)
    assert await stored["Body"].read() == data  # the bad copy was deleted, a good one put


async def test_two_replicas_filling_one_cold_blob_leave_one_good_object(
    fake: FakeRegistry, moto: MotoServer, bucket: str, s3: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    data = random_bytes(LAYER, 11)
    digest = fake.add_blob(NAME, data)
    a = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "a"))
    b = await replica(aiohttp_client, s3_config(tmp_path, fake, bucket, moto.url, "b"))
    gets = [
        m.client.get(f"/v2/{NAME}/blobs/{digest}", params=FAKE) for m in (a, b) for _ in range(3)
    ]
    for resp in await asyncio.gather(*gets):
        assert await resp.read() == data
    await poll(
        lambda: (
            sum(
                m.metric("mirror_s3_uploads_total", result=r)
                for m in (a, b)
                for r in ("done", "skipped")
            )
            >= 2
        ),
        within=20,
        what="both replicas' uploads to settle",
    )
    listed = await s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == [key_of(digest)]
    stored = await s3.get_object(Bucket=bucket, Key=listed["Contents"][0]["Key"])
    assert await stored["Body"].read() == data
    assert sum(m.metric("mirror_s3_uploads_total", result="done") for m in (a, b)) <= 1
