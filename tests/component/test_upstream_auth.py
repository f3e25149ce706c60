"""The upstream client through the real app: whose credentials go where, tokens a registry
refuses or scopes differently, and how its failures (timeouts, Retry-After, the breaker, error
codes, rate limits) reach the client. Assertions count requests at the fake registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from mirror.config import Config, RegistryConfig
from mirror.metrics import Metrics
from mirror.upstream.breaker import CircuitBreaker
from mirror.upstream.client import RegistryClient
from mirror.upstream.errors import UpstreamError, UpstreamUnavailable
from mirror.upstream.tokens import TokenCache

from .conftest import MakeMirror
from .fakeregistry import FakeRegistry, Image
from .harness import CDN_ALLOWED, TEST_UPSTREAM, FakeClock, KiB, mirror_config, poll, random_bytes

FAKE = {"ns": "fake.test"}
USER, PASSWORD = "mirror-bot", "s3cret-pass"


def seed(fake: FakeRegistry, tag: str = "v1", layers: int = 2) -> Image:
    return fake.add_image("team/app", tag, [random_bytes(20 * KiB, i) for i in range(layers)])


def with_credentials(tmp_path: Path, fake: FakeRegistry, **upstream: Any) -> Config:
    base = mirror_config(tmp_path / "cache", fake.url, **upstream)
    registry = RegistryConfig("fake.test", fake.url, username=USER, password=PASSWORD)
    return replace(base, registries=MappingProxyType({**base.registries, "fake.test": registry}))


def statuses(fake: FakeRegistry) -> list[tuple[str, int]]:
    """(kind, status) of each request, a 206 (blobs are fetched by Range) counted as 200."""
    return [(r.kind, 200 if r.status == 206 else r.status) for r in fake.log]


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str, dict[str, Any]]:
    entry = (await resp.json())["errors"][0]
    return resp.status, entry["code"], entry


# -- whose credentials go where ------------------------------------------------------------------


@dataclass
class Thief:
    """A host that would love the registry's credentials: it records whoever calls its realm."""

    realm: str = ""
    calls: list[str] = field(default_factory=list)  # the Authorization header of each call


@pytest.fixture
async def thief() -> AsyncIterator[Thief]:
    out = Thief()

    async def steal(request: web.Request) -> web.Response:
        out.calls.append(request.headers.get("Authorization", ""))
        return web.json_response({"token": "evil-token", "expires_in": 3600})

    app = web.Application()
    app.router.add_get("/steal", steal)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    out.realm = f"http://127.0.0.1:{server.port}/steal"
    try:
        yield out
    finally:
        await server.close()


async def test_a_401_after_a_redirect_never_gets_the_registrys_credentials(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, thief: Thief
) -> None:
    fake.auth = True
    fake.redirect = True
    image = seed(fake)
    cfg = with_credentials(tmp_path, fake, redirect_allow=CDN_ALLOWED)
    mirror = await make_mirror(config=cfg)
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.config}", params=FAKE)
    assert resp.status == 200  # the registry's token is cached: sent straight away now
    challenge = f'Bearer realm="{thief.realm}",service="cdn"'
    fake.fault("challenge", kind="cdn", challenge=challenge)
    # The CDN's 401 is the CDN's business: refused, and nothing is sent to its realm.
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert (await error_of(resp))[:2] == (403, "DENIED")
    # The next pull still answers the registry's own challenge, with the registry's token.
    fake.clear_faults()
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[1]}", params=FAKE)
    assert resp.status == 200
    await resp.read()
    assert thief.calls == []
    sent = [r.authorization or "" for r in fake.log if r.kind == "blob"]
    assert "evil-token" not in " ".join(sent)
    assert all(r.authorization is None for r in fake.requests("cdn"))
    # Only the registry's own realm ever got the credentials (Basic, to fetch a token).
    assert all(r.kind == "token" for r in fake.log if (r.authorization or "").startswith("Basic"))
    assert fake.count("token") == 1  # the token from the first pull serves the rest


# -- tokens the registry refuses -----------------------------------------------------------------


async def test_a_refused_token_is_replaced_once(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    """A registry restart (or revocation) voids tokens the mirror still thinks valid."""
    fake.auth = True
    image = seed(fake, layers=3)
    mirror = await make_mirror()
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 200
    assert fake.count("token") == 1

    fake.tokens.clear()  # the registry forgot every token it issued
    fake.reset_log()
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[1]}", params=FAKE)
    assert resp.status == 200
    assert statuses(fake) == [("blob", 401), ("token", 200), ("blob", 200)]
    fake.reset_log()  # the new token serves the next request at once
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[2]}", params=FAKE)
    assert resp.status == 200
    assert statuses(fake) == [("blob", 200)]


async def test_a_token_refused_even_when_fresh_is_given_up_on(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    fake.auth = True
    fake.token_lifetime = 0  # the registry refuses every token it issues
    image = seed(fake)
    mirror = await make_mirror()
    for attempt in range(2):
        fake.reset_log()
        resp = await mirror.client.get(f"/v2/team/app/manifests/{image.digest}", params=FAKE)
        assert (await error_of(resp))[:2] == (403, "DENIED"), attempt
        # One fresh token and one try with it, then an answer: no loop, no stale token kept.
        assert [(r.kind, r.status) for r in fake.log] == [
            ("manifest-digest", 401), ("token", 200), ("manifest-digest", 401),
        ], attempt  # fmt: skip


async def test_a_challenge_scope_other_than_pull_costs_one_401_per_repository(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    fake.auth = True
    fake.actions = "pull,push"  # what the challenge names, not what the mirror would ask
    image = seed(fake, layers=3)
    mirror = await make_mirror()
    for path in (
        f"/v2/team/app/manifests/{image.digest}",
        f"/v2/team/app/blobs/{image.config}",
        *(f"/v2/team/app/blobs/{d}" for d in image.layers),
    ):
        resp = await mirror.client.get(path, params=FAKE)
        assert resp.status == 200, path
        await resp.read()
    assert fake.count("token") == 1
    assert [r.query["scope"] for r in fake.requests("token")] == ["repository:team/app:pull,push"]
    assert sum(1 for r in fake.log if r.status == 401) == 1  # the first request only


# -- deadlines and the breaker -------------------------------------------------------------------


async def test_a_timeout_given_to_the_client_counts_towards_the_breaker(
    fake: FakeRegistry,
) -> None:
    """How tag revalidation bounds its HEAD: the client times out itself and counts it, where
    a caller's asyncio.timeout would cancel it before it could."""
    seed(fake, "a")
    seed(fake, "b")
    fake.fault("silent")  # the origin's ping too: the breaker's probe times out as well
    registries = {"fake.test": RegistryConfig("fake.test", fake.url)}
    config = replace(TEST_UPSTREAM, header_timeout=0.3, breaker_failures=2)
    async with aiohttp.ClientSession() as session:
        breaker = CircuitBreaker(2, 60.0, time.monotonic)
        tokens = TokenCache(session, aiohttp.ClientTimeout(total=5), time.monotonic)
        client = RegistryClient(session, registries, config, tokens, breaker, Metrics())
        for tag in ("a", "b"):
            with pytest.raises(UpstreamUnavailable, match="in time"):
                await client.head_manifest(
                    "fake.test", "team/app", tag, retry=False, attempt_timeout=0.1
                )
        await poll(lambda: breaker.is_open("fake.test"), what="the probe to time out")
        with pytest.raises(UpstreamUnavailable, match="is failing"):
            await client.head_manifest(
                "fake.test", "team/app", "a", retry=False, attempt_timeout=0.1
            )
        await client.close()
    assert fake.count("manifest-tag") == 2  # the third never left
    assert fake.count("base") == 1


async def test_the_pieces_of_one_blob_are_one_request_to_the_breaker(
    fake: FakeRegistry,
) -> None:
    """A blob download that retries its pieces itself (retry=False here): however many
    pieces fail however often, the breaker counts one failing request, and does not even
    ask the origin whether it is down."""
    data = random_bytes(64 * KiB, 7)
    digest = fake.add_blob("team/app", data)
    fake.fault("status", status=503, kind="blob")
    registries = {"fake.test": RegistryConfig("fake.test", fake.url)}
    config = replace(TEST_UPSTREAM, breaker_failures=2)
    async with aiohttp.ClientSession() as session:
        breaker = CircuitBreaker(2, 60.0, time.monotonic)
        tokens = TokenCache(session, aiohttp.ClientTimeout(total=5), time.monotonic)
        client = RegistryClient(session, registries, config, tokens, breaker, Metrics())
        for start in range(0, 64 * KiB, 4 * KiB):
            for _ in range(3):
                with pytest.raises(UpstreamError):
                    await client.open_blob(
                        "fake.test", "team/app", digest, start, start + 4 * KiB - 1, retry=False
                    )
        fake.clear_faults()
        body = await client.open_blob("fake.test", "team/app", digest)
        assert await body.response.read() == data
        body.release()
        await client.close()
    assert fake.count("blob") == 16 * 3 + 1  # each call one attempt: retry=False
    assert fake.count("base") == 0
    assert not breaker.is_open("fake.test")


async def test_half_open_breaker_lets_one_trial_through_and_fails_the_rest_fast(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    image = seed(fake)
    mirror = await make_mirror(retries=0, breaker_failures=2, breaker_cooldown=0.3)
    fake.fault("status", status=500, kind="manifest-tag", times=2)
    fake.fault("status", status=500, kind="base", times=1)  # the origin's ping fails too
    for tag in ("a", "b"):
        resp = await mirror.client.get(f"/v2/team/app/manifests/{tag}", params=FAKE)
        assert resp.status == 503
    await poll(
        lambda: mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 1,
        what="the probe to fail",
    )
    await poll(
        lambda: mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 0,
        what="the cooldown to end",
    )
    gate = fake.fault("hold", kind="manifest-tag", times=1)
    trial = asyncio.create_task(mirror.client.get("/v2/team/app/manifests/v1", params=FAKE))
    await gate.reached.wait()
    asked = fake.count()
    # The trial is out: everything else for this registry fails fast, without asking.
    for path in (
        "/v2/team/app/manifests/other",
        f"/v2/team/app/manifests/{image.digest}",
        f"/v2/team/app/blobs/{image.layers[0]}",
    ):
        resp = await mirror.client.get(path, params=FAKE)
        status, code, entry = await error_of(resp)
        assert (status, code) == (503, "UNAVAILABLE"), path
        assert "fake.test" in entry["message"]
    assert fake.count() == asked
    gate.release()
    resp = await trial
    assert resp.status == 200
    assert await resp.read() == image.manifest
    # Its success closed the breaker: everyone goes through again.
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 200
    assert fake.count("blob") == 1


# -- Retry-After ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "1e400", "soon", "Wed, 32 Oct 2015 x"])
async def test_an_unreadable_retry_after_is_a_503_not_a_crash(
    fake: FakeRegistry, make_mirror: MakeMirror, value: str
) -> None:
    seed(fake)
    mirror = await make_mirror()
    fake.fault("status", status=429, retry_after=value)
    resp = await mirror.client.get("/v2/team/app/manifests/v1", params=FAKE)
    assert (await error_of(resp))[:2] == (503, "UNAVAILABLE")
    assert "Retry-After" not in resp.headers  # nothing usable to pass on


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("7", 7, 7),
        ("99999999", 3600, 3600),  # capped
        ("http-date+120", 110, 120),  # a date 120 s ahead, read against the wall clock
        ("http-date+86400", 3600, 3600),
    ],
)
async def test_retry_after_holds_manifest_gets_off_for_as_long_as_it_says_at_most_an_hour(
    fake: FakeRegistry, make_mirror: MakeMirror, value: str, low: int, high: int
) -> None:
    image = seed(fake)
    mirror = await make_mirror()
    if value.startswith("http-date+"):
        value = formatdate(time.time() + int(value.removeprefix("http-date+")), usegmt=True)
    fake.fault("status", status=429, retry_after=value)
    resp = await mirror.client.get("/v2/team/app/manifests/v1", params=FAKE)
    assert resp.status == 503
    assert low <= int(resp.headers["Retry-After"]) <= high
    asked = fake.count()
    resp = await mirror.client.get(f"/v2/team/app/manifests/{image.digest}", params=FAKE)
    assert resp.status == 503  # held off: not asked again
    assert low <= int(resp.headers["Retry-After"]) <= high
    assert fake.count() == asked
    held = mirror.metric("mirror_upstream_hold_seconds", registry="fake.test", kind="manifest")
    assert low - 1 <= held <= high


async def test_a_429_with_retry_after_zero_still_holds_its_kind_for_a_cooldown(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    image = seed(fake)
    mirror = await make_mirror(retries=0, breaker_failures=2, breaker_cooldown=60.0)
    fake.fault("status", status=429, retry_after="0", kind="manifest-tag")
    for tag in ("a", "b"):
        resp = await mirror.client.get(f"/v2/team/app/manifests/{tag}", params=FAKE)
        assert resp.status == 503
    assert fake.count() == 1  # the second was held: the origin is spared
    assert resp.headers["Retry-After"] == "60"
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 200  # another kind of request: not held
    assert mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 0


# -- what the client is told ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (500, None, (503, "UNAVAILABLE")),
        (502, "UNKNOWN", (503, "UNAVAILABLE")),
        (503, "UNAVAILABLE", (503, "UNAVAILABLE")),
        (400, "NAME_INVALID", (400, "NAME_INVALID")),
        (400, "DIGEST_INVALID", (400, "DIGEST_INVALID")),
        (400, "MANIFEST_INVALID", (400, "MANIFEST_INVALID")),
        (400, "SIZE_INVALID", (502, "UNKNOWN")),  # not in the mirror's table: bad gateway
        (418, None, (502, "UNKNOWN")),
    ],
)
async def test_upstream_answers_reach_the_client_with_their_meaning(
    fake: FakeRegistry,
    make_mirror: MakeMirror,
    status: int,
    code: str | None,
    expected: tuple[int, str],
) -> None:
    image = seed(fake)
    mirror = await make_mirror(retries=0)
    fake.fault("status", status=status, code=code)
    resp = await mirror.client.get(f"/v2/team/app/manifests/{image.digest}", params=FAKE)
    got_status, got_code, entry = await error_of(resp)
    assert (got_status, got_code) == expected
    assert entry["detail"]["registry"] == "fake.test"
    assert entry["detail"]["upstream_status"] == status
    if got_status >= 500:
        assert "fake.test" in entry["message"]


# -- Docker Hub's rate limit ----------------------------------------------------------------------


async def test_ratelimit_remaining_is_logged_when_first_seen_and_as_it_runs_low(
    fake: FakeRegistry, make_mirror: MakeMirror
) -> None:
    image = seed(fake, layers=1)
    mirror = await make_mirror()
    paths = [f"/v2/team/app/manifests/{image.digest}", f"/v2/team/app/blobs/{image.config}"]
    paths += [f"/v2/team/app/blobs/{image.layers[0]}", "/v2/team/app/manifests/v1"]
    remaining = ["90", "90", "5", "4"]
    with capture_logs() as logs:
        for path, left in zip(paths, remaining, strict=True):
            fake.response_headers = {
                "ratelimit-limit": "100;w=21600",
                "ratelimit-remaining": f"{left};w=21600",
            }
            resp = await mirror.client.get(path, params=FAKE)
            assert resp.status == 200, path
            await resp.read()
    logged = [e for e in logs if e["event"] == "upstream_ratelimit"]
    assert [(e["log_level"], e["remaining"]) for e in logged] == [
        ("info", 90), ("warning", 5), ("warning", 4),
    ]  # fmt: skip
    assert all(e["limit"] == 100 and e["registry"] == "fake.test" for e in logged)
    assert mirror.metric("mirror_upstream_ratelimit_remaining", registry="fake.test") == 4


# -- tag list pagination -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_page", "next_page"),
    [
        ("/v2/team/app/tags/list?ns=fake.test&n=2", "/v2/team/app/tags/list?ns=fake.test&"),
        ("/v2/fake.test/team/app/tags/list?n=2", "/v2/fake.test/team/app/tags/list?"),
    ],
)
async def test_a_tag_list_pages_through_the_mirror(
    fake: FakeRegistry, make_mirror: MakeMirror, first_page: str, next_page: str
) -> None:
    """skopeo list-tags follows Link: each page must come from the mirror, on the same route."""
    fake.tag_links = True
    for tag in ("a", "b", "c", "d", "e"):
        seed(fake, tag, layers=1)
    mirror = await make_mirror()
    url: str | None = first_page
    pages: list[list[str]] = []
    while url is not None:
        resp = await mirror.client.get(url)
        assert resp.status == 200, url
        pages.append((await resp.json())["tags"])
        link = resp.headers.get("Link")
        url = None if link is None else link[1 : link.index(">")]
        if url is not None:
            assert url.startswith(next_page), url
    assert pages == [["a", "b"], ["c", "d"], ["e"]]
    assert [r.query for r in fake.requests("tags")] == [
        {"n": "2"}, {"last": "b", "n": "2"}, {"last": "d", "n": "2"},
    ]  # fmt: skip


async def test_a_silent_upstream_during_revalidation_opens_the_breaker(
    fake: FakeRegistry, make_mirror: MakeMirror, tmp_path: Path, clock: FakeClock
) -> None:
    base = mirror_config(
        tmp_path / "cache", fake.url, header_timeout=0.4, retries=0, breaker_failures=2,
        breaker_cooldown=60.0,
    )  # fmt: skip
    cache = replace(base.cache, tag_ttl=0.05, revalidate_timeout=0.2)
    mirror = await make_mirror(config=replace(base, cache=cache), clock=clock)
    for tag in ("a", "b", "c"):
        seed(fake, tag, layers=1)
        resp = await mirror.client.get(f"/v2/team/app/manifests/{tag}", params=FAKE)
        assert resp.status == 200
    clock.advance(0.1)  # every tag is past its TTL
    fake.fault("silent")  # and the origin's ping, which decides
    for tag in ("a", "b"):
        resp = await mirror.client.head(f"/v2/team/app/manifests/{tag}", params=FAKE)
        assert resp.status == 200  # stale, within max_stale
    # Two silent HEADs of different tags: the origin is asked whether it is down, and stays
    # silent past header_timeout. From then on the third tag is served without asking.
    await poll(
        lambda: mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 1,
        what="the probe to time out",
    )
    resp = await mirror.client.head("/v2/team/app/manifests/c", params=FAKE)
    assert resp.status == 200
    assert fake.count("manifest-tag", method="HEAD") == 2
    assert fake.count("base") == 1
    assert mirror.requests("manifest", "stale") == 3
