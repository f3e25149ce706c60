"""Pull-through core: routing, manifests, blobs, auth, redirects and upstream failures."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from yarl import URL

from mirror.config import RegistryConfig

from .conftest import MakeMirror
from .fakeregistry import OCI_MANIFEST, FakeRegistry, Image
from .harness import (
    CDN_ALLOWED,
    KiB,
    MiB,
    Mirror,
    closed_port,
    mirror_config,
    poll,
    random_bytes,
    wait_cached,
)

FAKE = {"ns": "fake.test"}
ALL_MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def seed(fake: FakeRegistry, name: str = "team/app", tag: str = "v1") -> Image:
    return fake.add_image(name, tag, [random_bytes(300 * KiB, 1), random_bytes(40 * KiB, 2)])


async def error_code(resp: Any) -> str:
    doc = await resp.json()
    return str(doc["errors"][0]["code"])


# -- routing -------------------------------------------------------------------------------------


@pytest.mark.both_paths
@pytest.mark.parametrize(
    ("path", "query", "upstream_name"),
    [
        ("/v2/team/app/manifests/v1", {"ns": "fake.test"}, "team/app"),  # containerd
        ("/v2/fake.test/team/app/manifests/v1", {}, "team/app"),  # skopeo, override_path
        ("/v2/team/app/manifests/v1", {}, "team/app"),  # Docker Engine: default registry
        ("/v2/nginx/manifests/v1", {}, "library/nginx"),  # Docker Hub official image
        ("/v2/docker.io/nginx/manifests/v1", {}, "library/nginx"),
        ("/v2/nginx/manifests/v1", {"ns": "docker.io"}, "library/nginx"),
        ("/v2/library/nginx/manifests/v1", {"ns": "index.docker.io"}, "library/nginx"),
    ],
)
async def test_requests_reach_the_registry_they_name(
    fake: FakeRegistry, mirror: Mirror, path: str, query: dict[str, str], upstream_name: str
) -> None:
    image = seed(fake, upstream_name)
    resp = await mirror.client.get(path, params=query)
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert [r.name for r in fake.requests(kind="manifest-tag")] == [upstream_name]


@pytest.mark.both_paths
async def test_registry_named_by_host_and_port(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Any
) -> None:
    """containerd names a local registry `host:port` and percent-encodes it in ns."""
    host = fake.url.removeprefix("http://")
    base = mirror_config(tmp_path / "cache", fake.url)
    registries = MappingProxyType({host: RegistryConfig(host, fake.url)})
    mirror = await make_mirror(config=replace(base, registries=registries, default_registry=host))
    image = seed(fake)
    encoded = host.replace(":", "%3A")
    for path in (f"/v2/team/app/manifests/v1?ns={encoded}", f"/v2/{host}/team/app/manifests/v1"):
        resp = await mirror.client.get(URL(path, encoded=True))
        assert resp.status == 200, path
        assert await resp.read() == image.manifest
    assert [r.name for r in fake.requests(kind="manifest-tag")] == ["team/app"]  # then cached


@pytest.mark.both_paths
@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v2/team/app/manifests/v1", {"ns": "evil.example"}),
        ("/v2/evil.example/team/app/manifests/v1", {}),
        ("/v2/evil.example/team/app/blobs/sha256:" + "a" * 64, {}),
        ("/v2/team/app/manifests/v1", {"ns": "127.0.0.1:1"}),
    ],
)
async def test_unconfigured_registry_is_denied(
    fake: FakeRegistry, mirror: Mirror, path: str, query: dict[str, str]
) -> None:
    resp = await mirror.client.get(path, params=query)
    assert resp.status == 403
    assert resp.content_type == "application/json"
    assert await error_code(resp) == "DENIED"
    assert fake.log == []  # not an open proxy: nothing went anywhere


@pytest.mark.both_paths
@pytest.mark.parametrize(
    "path",
    [
        "/v2/fake.test/Team/App/manifests/v1",
        "/v2/fake.test/team/-app/manifests/v1",
        "/v2/fake.test/team/a..b/blobs/sha256:" + "a" * 64,
        "/v2/fake.test/team/_tags/manifests/v1",
    ],
)
async def test_invalid_name_is_rejected(fake: FakeRegistry, mirror: Mirror, path: str) -> None:
    resp = await mirror.client.get(path)
    assert resp.status == 400
    assert await error_code(resp) == "NAME_INVALID"
    assert fake.log == []


@pytest.mark.both_paths
@pytest.mark.parametrize(
    "path",
    [
        "/v2/fake.test/team/app/blobs/sha256:abc",
        "/v2/fake.test/team/app/blobs/sha256:" + "A" * 64,
        "/v2/fake.test/team/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
        "/v2/fake.test/team/app/blobs/latest",
        "/v2/fake.test/team/app/manifests/sha256:xyz",
        "/v2/fake.test/team/app/manifests/sha512:" + "a" * 128,
    ],
)
async def test_invalid_digest_is_rejected(fake: FakeRegistry, mirror: Mirror, path: str) -> None:
    resp = await mirror.client.get(path)
    assert resp.status == 400
    assert await error_code(resp) == "DIGEST_INVALID"
    assert fake.log == []


# -- manifests -----------------------------------------------------------------------------------


@pytest.mark.both_paths
async def test_manifest_by_tag_and_digest_is_the_exact_upstream_manifest(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    image = seed(fake)
    for ref in ("v1", image.digest):
        resp = await mirror.client.get(f"/v2/team/app/manifests/{ref}", params=FAKE)
        assert resp.status == 200
        assert await resp.read() == image.manifest  # byte for byte: the digest covers them
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert resp.headers["Content-Length"] == str(len(image.manifest))
    # The tag was fetched with every manifest type listed, so any client can be served later.
    accept = ", ".join(fake.requests(kind="manifest-tag")[0].accept)
    for media_type in ALL_MANIFEST_TYPES:
        assert media_type in accept
    assert fake.count(kind="manifest-digest") == 0  # the tag fetch already stored it


@pytest.mark.both_paths
@pytest.mark.parametrize("ref", ["tag", "digest"])
async def test_manifest_head_has_the_get_headers_and_no_body(
    fake: FakeRegistry, mirror: Mirror, ref: str
) -> None:
    image = seed(fake)
    reference = "v1" if ref == "tag" else image.digest
    url = f"/v2/team/app/manifests/{reference}"
    head = await mirror.client.head(url, params=FAKE)  # cold: containerd's first request
    get = await mirror.client.get(url, params=FAKE)
    assert head.status == get.status == 200
    for name in ("Content-Type", "Docker-Content-Digest", "Content-Length"):
        assert head.headers[name] == get.headers[name], name
    assert head.headers["Content-Length"] == str(len(image.manifest))
    assert await head.read() == b""
    assert await get.read() == image.manifest


@pytest.mark.both_paths
async def test_manifest_accepted_from_separate_accept_lines(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    """skopeo and podman send one Accept header per media type; the OCI one is not first."""
    image = seed(fake)
    headers = [
        ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
        ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ("Accept", "application/vnd.oci.image.index.v1+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.v1+json"),
    ]
    for ref in ("v1", image.digest):
        resp = await mirror.client.get(f"/v2/fake.test/team/app/manifests/{ref}", headers=headers)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert await resp.read() == image.manifest


async def test_tags_list_passes_paging_through_encoded(fake: FakeRegistry, mirror: Mirror) -> None:
    for tag in ("a", "b", "c"):
        fake.add_manifest("team/app", tag.encode(), tag=tag)
    resp = await mirror.client.get("/v2/fake.test/team/app/tags/list", params={"n": "1"})
    assert await resp.json() == {"name": "team/app", "tags": ["a"]}
    # Client values stay values: neither a new parameter nor a broken request line upstream.
    resp = await mirror.client.get(
        "/v2/fake.test/team/app/tags/list", params={"n": "1", "last": "a b&n=5"}
    )
    assert resp.status == 200
    assert fake.requests(kind="tags")[-1].query == {"n": "1", "last": "a b&n=5"}


# -- blobs ---------------------------------------------------------------------------------------


async def test_blob_get_and_head(fake: FakeRegistry, mirror: Mirror) -> None:
    data = random_bytes(MiB + 123, 3)
    digest = fake.add_blob("team/app", data)
    url = f"/v2/team/app/blobs/{digest}"
    head = await mirror.client.head(url, params=FAKE)  # cold: asks upstream with a HEAD
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert await head.read() == b""
    assert fake.count(kind="blob", method="GET") == 0  # a HEAD never starts a download
    resp = await mirror.client.get(url, params=FAKE)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Docker-Content-Digest"] == digest
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == data
    head = await mirror.client.head(url, params=FAKE)  # warm
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert await head.read() == b""


async def test_empty_blob(fake: FakeRegistry, mirror: Mirror) -> None:
    """Zero-length blobs exist (artifacts); Go registries answer 416 to a Range on them."""
    digest = fake.add_blob("team/app", b"")
    for _ in range(2):  # cold, then cached
        resp = await mirror.client.get(f"/v2/team/app/blobs/{digest}", params=FAKE)
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "0"
        assert await resp.read() == b""
        await wait_cached(mirror, digest)
    assert fake.download_sessions() == 1


async def test_range_on_a_cached_blob(fake: FakeRegistry, mirror: Mirror) -> None:
    data = random_bytes(200 * KiB, 4)
    digest = fake.add_blob("team/app", data)
    url = f"/v2/team/app/blobs/{digest}"
    assert await (await mirror.client.get(url, params=FAKE)).read() == data
    await wait_cached(mirror, digest)
    fake.reset_log()

    resp = await mirror.client.get(url, params=FAKE, headers={"Range": "bytes=1000-"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert await resp.read() == data[1000:]

    resp = await mirror.client.get(url, params=FAKE, headers={"Range": "bytes=10-19"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert await resp.read() == data[10:20]

    resp = await mirror.client.get(url, params=FAKE, headers={"Range": f"bytes={len(data)}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    assert fake.log == []


# -- read-only -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v2/fake.test/team/app/manifests/v1"),
        ("DELETE", "/v2/fake.test/team/app/manifests/v1"),
        ("DELETE", "/v2/fake.test/team/app/blobs/sha256:" + "a" * 64),
        ("POST", "/v2/fake.test/team/app/blobs/uploads/"),
        ("PATCH", "/v2/fake.test/team/app/blobs/uploads/some-uuid"),
        ("PUT", "/v2/fake.test/team/app/blobs/uploads/some-uuid?digest=sha256:" + "a" * 64),
        ("GET", "/v2/fake.test/team/app/blobs/uploads/some-uuid"),
        ("GET", "/v2/_catalog"),
    ],
)
async def test_writes_are_unsupported(
    fake: FakeRegistry, mirror: Mirror, method: str, path: str
) -> None:
    resp = await mirror.client.request(method, path, data=b"{}")
    assert resp.status == 405
    assert await error_code(resp) == "UNSUPPORTED"
    assert fake.log == []


# -- upstream auth and redirects -----------------------------------------------------------------


async def pull(mirror: Mirror, image: Image, query: dict[str, str] = FAKE) -> None:
    """What containerd does: tag HEAD, manifest GET by digest, then every blob."""
    base = f"/v2/{image.name}"
    resp = await mirror.client.head(f"{base}/manifests/{image.tag}", params=query)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest
    resp = await mirror.client.get(f"{base}/manifests/{image.digest}", params=query)
    assert await resp.read() == image.manifest
    for digest in (image.config, *image.layers):
        resp = await mirror.client.get(f"{base}/blobs/{digest}", params=query)
        assert resp.status == 200
        body = await resp.read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


async def test_token_auth_fetches_one_token_for_many_requests(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    fake.auth = True
    image = seed(fake)
    await pull(mirror, image)
    assert fake.count(kind="token") == 1
    token_req = fake.requests(kind="token")[0]
    assert token_req.query == {"service": "fake", "scope": "repository:team/app:pull"}
    # One challenge, then the cached token goes with every request up front.
    assert sum(1 for r in fake.log if r.status == 401) == 1


async def test_concurrent_token_fetches_coalesce(fake: FakeRegistry, mirror: Mirror) -> None:
    fake.auth = True
    blobs = {fake.add_blob("team/app", random_bytes(10 * KiB, i)): i for i in range(20)}
    gate = fake.fault("hold", kind="token")  # every request is waiting on the token at once

    async def get(digest: str) -> bytes:
        resp = await mirror.client.get(f"/v2/team/app/blobs/{digest}", params=FAKE)
        assert resp.status == 200
        return await resp.read()

    tasks = [asyncio.ensure_future(get(d)) for d in blobs]
    await gate.reached.wait()
    await poll(lambda: sum(1 for r in fake.log if r.status == 401) == 20)
    gate.release()
    bodies = await asyncio.gather(*tasks)
    assert bodies == [random_bytes(10 * KiB, i) for i in blobs.values()]
    assert fake.count(kind="token") == 1


@pytest.mark.parametrize("size", [40 * KiB, MiB], ids=["single-request", "ranged"])
async def test_blob_redirect_is_followed_without_authorization(
    fake: FakeRegistry, make_mirror: MakeMirror, size: int
) -> None:
    mirror = await make_mirror(redirect_allow=CDN_ALLOWED)  # the fake's CDN is on 127.0.0.1
    fake.auth = True
    fake.redirect = True
    data = random_bytes(size, 5)
    digest = fake.add_blob("team/app", data)
    resp = await mirror.client.get(f"/v2/team/app/blobs/{digest}", params=FAKE)
    assert resp.status == 200
    assert await resp.read() == data
    cdn = fake.requests(kind="cdn")
    assert cdn and all(r.status in (200, 206) for r in cdn)
    assert all(r.authorization is None for r in cdn)  # the 400 trap was never triggered
    registry = [r for r in fake.requests(kind="blob") if r.status == 307]
    assert registry and all(r.authorization for r in registry)
    assert fake.body_bytes("cdn") == size

    other = fake.add_blob("team/app", random_bytes(size, 6))
    head = await mirror.client.head(f"/v2/team/app/blobs/{other}", params=FAKE)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(size)
    assert fake.requests(kind="cdn", method="HEAD")[0].authorization is None


# -- upstream failures ---------------------------------------------------------------------------


@pytest.mark.both_paths
async def test_upstream_404_is_blob_or_manifest_unknown(fake: FakeRegistry, mirror: Mirror) -> None:
    seed(fake)
    missing = "sha256:" + "0" * 64
    cases = [
        (f"/v2/team/app/blobs/{missing}", "BLOB_UNKNOWN"),
        (f"/v2/team/app/manifests/{missing}", "MANIFEST_UNKNOWN"),
        ("/v2/team/app/manifests/nope", "MANIFEST_UNKNOWN"),
        ("/v2/team/other/manifests/v1", "MANIFEST_UNKNOWN"),
    ]
    for path, code in cases:
        resp = await mirror.client.get(path, params=FAKE)
        assert resp.status == 404, path
        assert await error_code(resp) == code, path
        head = await mirror.client.head(path, params=FAKE)
        assert head.status == 404, path
        assert await head.read() == b""


@pytest.mark.parametrize("kind", ["manifest-tag", "manifest-digest", "blob"])
async def test_upstream_500_is_503(fake: FakeRegistry, mirror: Mirror, kind: str) -> None:
    image = seed(fake)
    fake.fault("status", status=500)
    path = {
        "manifest-tag": "/v2/team/app/manifests/v1",
        "manifest-digest": f"/v2/team/app/manifests/{image.digest}",
        "blob": f"/v2/team/app/blobs/{image.layers[0]}",
    }[kind]
    resp = await mirror.client.get(path, params=FAKE)
    assert resp.status == 503  # "try elsewhere" for every client
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert fake.count(kind=kind) == 3  # retried (retries=2), and no more than that


async def test_upstream_429_is_503_with_retry_after_and_holds_off(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    image = seed(fake)
    fake.fault("status", status=429, retry_after="7", kind="manifest-tag")
    resp = await mirror.client.get("/v2/team/app/manifests/v1", params=FAKE)
    assert resp.status == 503  # never 429: skopeo would back off for ~30 s
    assert resp.headers["Retry-After"] == "7"
    assert fake.count() == 1  # a 429 is not retried at once
    # While the registry asked us to wait, manifest GETs fail fast without asking again.
    started = time.monotonic()
    resp = await mirror.client.get(f"/v2/team/app/manifests/{image.digest}", params=FAKE)
    assert resp.status == 503
    assert time.monotonic() - started < 0.5
    assert fake.count() == 1


async def test_slow_upstream_within_the_header_timeout_is_served(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror(header_timeout=1.0)
    image = seed(fake)
    fake.fault("slow", delay=0.2)  # every request: slow, but within the deadline
    await pull(mirror, image)
    assert fake.count(kind="manifest-tag") == 1  # no timeout, no retry


async def test_unreachable_upstream_is_a_fast_503(make_mirror: MakeMirror, tmp_path: Any) -> None:
    config = mirror_config(tmp_path / "cache", f"http://127.0.0.1:{closed_port()}")
    mirror = await make_mirror(config=config)
    for path in ("/v2/team/app/manifests/v1", "/v2/team/app/blobs/sha256:" + "b" * 64):
        started = time.monotonic()
        resp = await mirror.client.get(path, params=FAKE)
        assert resp.status == 503, path
        assert await error_code(resp) == "UNAVAILABLE"
        assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("kind", ["manifest-tag", "blob", "token"])
async def test_silent_upstream_is_a_503_within_the_header_timeout(
    fake: FakeRegistry, make_mirror: MakeMirror, kind: str
) -> None:
    mirror = await make_mirror(header_timeout=0.5)
    image = seed(fake)
    if kind == "token":
        fake.auth = True
    fake.fault("silent", kind=kind)
    path = (
        f"/v2/team/app/blobs/{image.layers[0]}" if kind == "blob" else "/v2/team/app/manifests/v1"
    )
    started = time.monotonic()
    resp = await mirror.client.get(path, params=FAKE)
    elapsed = time.monotonic() - started
    assert resp.status == 503
    assert elapsed < 1.5, f"took {elapsed:.2f}s"


# -- the cache -----------------------------------------------------------------------------------


@pytest.mark.both_paths
async def test_second_pull_asks_the_upstream_nothing(
    fake: FakeRegistry, mirror: Mirror, make_mirror: MakeMirror
) -> None:
    image = seed(fake)
    await pull(mirror, image)
    for digest in (image.config, *image.layers):
        await wait_cached(mirror, digest)
    fake.reset_log()
    await pull(mirror, image)
    resp = await mirror.client.get(f"/v2/{image.name}/manifests/{image.tag}", params=FAKE)
    assert await resp.read() == image.manifest
    assert fake.log == []
    assert mirror.requests("blob", "hit") == 3

    # A restarted mirror on the same cache directory knows the content too.
    await mirror.client.close()  # one server per cache directory
    restarted = await make_mirror(config=mirror.config)
    await pull(restarted, image)
    assert fake.log == []


async def test_cached_content_survives_an_upstream_outage(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    image = seed(fake)
    await pull(mirror, image)
    for digest in (image.config, *image.layers):
        await wait_cached(mirror, digest)
    fake.fault("status", status=500)
    await pull(mirror, image)


async def test_a_manifest_larger_than_one_segment_arrives_whole(
    fake: FakeRegistry, mirror: Mirror
) -> None:
    # read(n) returns only what is buffered: a 1 MiB manifest spans many TCP segments.
    filler = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:"
               + f"{i:064x}", "size": i} for i in range(7000)]  # fmt: skip
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": filler[0],
                       "layers": filler}).encode()  # fmt: skip
    assert len(body) > 1024 * 1024
    digest = fake.add_manifest("team/big", body, OCI_MANIFEST, tag="1.0")
    resp = await mirror.client.get("/v2/team/big/manifests/1.0", params={"ns": "fake.test"})
    assert resp.status == 200
    assert await resp.read() == body
    assert resp.headers["Docker-Content-Digest"] == digest
