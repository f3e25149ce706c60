"""A hostile upstream's redirects and token realms: followed only where a registry may send the
mirror, refused with a quick 502 naming the registry everywhere else."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from mirror.config.values import parse_hosts_or_networks

from .conftest import MakeMirror
from .fakeregistry import FakeRegistry, Image
from .harness import CDN_ALLOWED, KiB, random_bytes

FAKE = {"ns": "fake.test"}
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"

# Where a blob's redirect leads, and why it is refused: "{cdn}" is the fake's CDN, another
# port of 127.0.0.1 (the registry's own is 127.0.0.1 too: only its origin is fine).
FORBIDDEN_BLOB_TARGETS = {
    "another-local-port": ("{cdn}/cdn/{ref}", "loopback"),
    "ipv6-loopback": ("http://[::1]:{cdn_port}/cdn/{ref}", "loopback"),
    "metadata-service": (METADATA, "link-local"),
    "ec2-metadata-ipv6": ("http://[fd00:ec2::254]/latest/meta-data/", "metadata service"),
    "unspecified": ("http://0.0.0.0:{cdn_port}/cdn/{ref}", "this-host"),
    "file": ("file:///etc/passwd", "file: URLs are never followed"),
    # A name for 127.0.0.1: the URL looks harmless, its address is not (checked on connect).
    "name-for-loopback": ("http://localhost:{cdn_port}/cdn/{ref}", "resolves to"),
}


def seed(fake: FakeRegistry) -> Image:
    return fake.add_image("team/app", "v1", [random_bytes(40 * KiB, 1)])


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str, dict[str, Any]]:
    entry = (await resp.json())["errors"][0]
    return resp.status, entry["code"], entry


def redirect_to(fake: FakeRegistry, location: str, **match: Any) -> None:
    location = location.replace("{cdn_port}", str(fake.cdn_port))
    fake.fault("redirect", location=location, **match)


@pytest.mark.parametrize("target", list(FORBIDDEN_BLOB_TARGETS))
async def test_a_blob_redirect_to_a_forbidden_place_is_a_quick_502(
    fake: FakeRegistry, make_mirror: MakeMirror, target: str
) -> None:
    mirror = await make_mirror(breaker_failures=2)
    image = seed(fake)
    location, reason = FORBIDDEN_BLOB_TARGETS[target]
    redirect_to(fake, location, kind="blob")
    for digest in (image.config, *image.layers):  # different requests: the breaker holds
        started = time.monotonic()
        resp = await mirror.client.get(f"/v2/team/app/blobs/{digest}", params=FAKE)
        status, code, entry = await error_of(resp)
        assert time.monotonic() - started < 1.0  # not retried, nothing waited for
        assert (status, code) == (502, "UNKNOWN")
        assert entry["message"].startswith("fake.test redirected to ")
        assert reason in entry["message"]
        assert "meta-data" not in entry["message"]  # a target's path is never repeated
        assert entry["detail"] == {"registry": "fake.test"}
    head = await mirror.client.head(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert head.status == 502
    assert fake.count(host="cdn") == 0  # nothing ever reached what was behind the redirect
    assert fake.count("blob") == 3
    assert fake.count("base") == 0  # the registry answered: no doubt about it being up
    assert mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 0


async def test_an_allowed_name_may_lead_to_loopback(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    """redirect_allow names what a private setup needs: here a CDN on this host, by name."""
    mirror = await make_mirror(redirect_allow=parse_hosts_or_networks("localhost"))
    image = seed(fake)
    redirect_to(fake, "http://localhost:{cdn_port}/cdn/{ref}", kind="blob")
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 200
    assert await resp.read() == random_bytes(40 * KiB, 1)
    assert fake.count(host="cdn") >= 1


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("allowed", [False, True], ids=["default", "cdn-allowed"])
async def test_a_tag_redirected_to_another_host_is_refused_and_nothing_is_cached(
    fake: FakeRegistry, make_mirror: MakeMirror, method: str, allowed: bool
) -> None:
    """A manifest from another host would let that host choose what the tag means: refused
    even where a blob may go (the CDN, when allowed), and never cached under the tag."""
    mirror = await make_mirror(redirect_allow=CDN_ALLOWED if allowed else ())
    image = seed(fake)
    other = fake.add_image("team/other", "x", [random_bytes(KiB, 2)])
    redirect_to(fake, "{cdn}/cdn/" + other.digest, kind="manifest-tag")
    resp = await mirror.client.request(method, "/v2/team/app/manifests/v1", params=FAKE)
    assert resp.status == 502
    if method == "GET":
        status, code, entry = await error_of(resp)
        assert "only blobs may come from another origin" in entry["message"]
    assert fake.count(host="cdn") == 0
    fake.clear_faults()
    resp = await mirror.client.get("/v2/team/app/manifests/v1", params=FAKE)
    assert resp.status == 200
    assert await resp.read() == image.manifest


async def test_a_tag_list_redirected_to_another_host_is_refused(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror(redirect_allow=CDN_ALLOWED)
    seed(fake)
    redirect_to(fake, "{cdn}/cdn/list", kind="tags")
    resp = await mirror.client.get("/v2/team/app/tags/list", params=FAKE)
    assert (await error_of(resp))[:2] == (502, "UNKNOWN")
    assert fake.count(host="cdn") == 0


async def test_a_manifest_redirected_within_the_registry_is_followed(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror()
    image = seed(fake)
    redirect_to(
        fake, "{registry}/v2/team/app/manifests/" + image.digest, kind="manifest-tag", ref="v1"
    )
    resp = await mirror.client.get("/v2/team/app/manifests/v1", params=FAKE)
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert [(r.kind, r.status) for r in fake.log] == [
        ("manifest-tag", 307),
        ("manifest-digest", 200),
    ]


@pytest.mark.parametrize(
    "realm",
    [METADATA + "token", "http://127.0.0.1:{cdn_port}/token", "http://localhost:{cdn_port}/t"],
    ids=["metadata-service", "another-local-port", "name-for-loopback"],
)
async def test_a_token_realm_in_a_forbidden_place_is_never_asked(
    fake: FakeRegistry, make_mirror: MakeMirror, realm: str
) -> None:
    """The mirror would send it the registry's credentials and hand its answer back to the
    registry as a token: a realm may lead where a blob redirect may, no further."""
    mirror = await make_mirror()
    seed(fake)
    realm = realm.replace("{cdn_port}", str(fake.cdn_port))
    challenge = f'Bearer realm="{realm}",service="fake",scope="repository:team/app:pull"'
    fake.fault("challenge", kind="manifest-tag", challenge=challenge)
    started = time.monotonic()
    resp = await mirror.client.get("/v2/team/app/manifests/v1", params=FAKE)
    status, code, entry = await error_of(resp)
    assert time.monotonic() - started < 1.0
    assert (status, code) == (502, "UNKNOWN")
    assert entry["message"].startswith("fake.test named a token realm ")
    assert fake.count(host="cdn") == 0
