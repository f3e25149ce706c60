"""Private ECR registries: Basic credentials from GetAuthorizationToken on a real moto server,
in front of the fake registry in ECR's Basic mode. AWS calls are counted at moto."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from aiobotocore.session import AioSession, get_session
from structlog.testing import capture_logs

from mirror.app import create_app
from mirror.config import Config, RegistryConfig

from .fakeregistry import FakeRegistry, Image
from .harness import KiB, Mirror, closed_port, mirror_config, random_bytes
from .moto import ECR_PASSWORD, ECR_USER, MotoServer

FAKE = {"ns": "fake.test"}
TOKEN = base64.b64encode(f"{ECR_USER}:{ECR_PASSWORD}".encode()).decode()
GET_TOKEN = "GetAuthorizationToken"

MakeEcrMirror = Callable[..., Awaitable[Mirror]]


def aws_session() -> AioSession:
    """Dummy keys given to the session itself: the test never touches os.environ."""
    session = get_session()
    session.set_credentials("AKIDTESTING", "not-a-real-secret")
    return session


def ecr_config(tmp_path: Path, fake: FakeRegistry, endpoint: str, **upstream: Any) -> Config:
    base = mirror_config(tmp_path / "cache", fake.url, **upstream)
    ecr = RegistryConfig("fake.test", fake.url, aws_region="us-east-1", aws_endpoint_url=endpoint)
    return replace(base, registries=MappingProxyType({**base.registries, "fake.test": ecr}))


@pytest.fixture
def make_ecr_mirror(
    aiohttp_client: Any, fake: FakeRegistry, moto: MotoServer, tmp_path: Path
) -> MakeEcrMirror:
    """make_ecr_mirror(endpoint=moto.url, **upstream_overrides): fake.test is an ECR registry."""

    async def make(endpoint: str | None = None, **upstream: Any) -> Mirror:
        config = ecr_config(tmp_path, fake, endpoint or moto.url, **upstream)
        app = create_app(config, aws_session=aws_session())
        return Mirror(await aiohttp_client(app), app, config)

    return make


def seed(fake: FakeRegistry, layers: int = 4) -> Image:
    fake.basic = (ECR_USER, ECR_PASSWORD)
    return fake.add_image("team/app", "v1", [random_bytes(8 * KiB, i) for i in range(layers)])


async def get(mirror: Mirror, path: str) -> tuple[int, bytes]:
    resp = await mirror.client.get(path, params=FAKE)
    return resp.status, await resp.read()


async def test_a_pull_uses_the_ecr_issued_basic_credentials(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    image = seed(fake)
    mirror = await make_ecr_mirror()
    status, body = await get(mirror, "/v2/team/app/manifests/v1")
    assert (status, body) == (200, image.manifest)
    for digest in [image.config, *image.layers]:
        assert (await get(mirror, f"/v2/team/app/blobs/{digest}"))[0] == 200
    assert moto.calls(GET_TOKEN) == 1
    # Sent as Basic, exactly as ECR decoded it: the token is the header's value.
    sent = {r.authorization for r in fake.log if r.status in (200, 206)}
    assert sent == {f"Basic {TOKEN}"}


async def test_concurrent_first_requests_make_one_aws_call_and_later_ones_none(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    image = seed(fake, layers=12)
    mirror = await make_ecr_mirror()
    paths = [f"/v2/team/app/blobs/{d}" for d in [image.config, *image.layers]]
    results = await asyncio.gather(*(get(mirror, p) for p in paths))
    assert [status for status, _ in results] == [200] * len(paths)
    assert moto.calls(GET_TOKEN) == 1
    # More pulls: the token is reused (moto's expiresAt is in 2015; the floor holds it).
    for i in range(5):
        digest = fake.add_blob("team/app", random_bytes(4 * KiB, 100 + i))
        assert (await get(mirror, f"/v2/team/app/blobs/{digest}"))[0] == 200
    assert moto.calls(GET_TOKEN) == 1


async def test_a_refused_token_is_replaced_once_and_the_request_retried(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    image = seed(fake)
    mirror = await make_ecr_mirror()
    assert (await get(mirror, f"/v2/team/app/blobs/{image.config}"))[0] == 200
    assert moto.calls(GET_TOKEN) == 1
    # The registry refuses the token once (revoked early): a new one, and the same request
    # goes again and succeeds.
    challenge = f'Basic realm="{fake.url}/",service="ecr.amazonaws.com"'
    fake.fault("challenge", kind="blob", challenge=challenge, times=1)
    fake.reset_log()
    status, body = await get(mirror, f"/v2/team/app/blobs/{image.layers[0]}")
    assert status == 200
    assert moto.calls(GET_TOKEN) == 2
    statuses = [(r.kind, 200 if r.status == 206 else r.status) for r in fake.log]
    assert statuses == [("blob", 401), ("blob", 200)]


async def test_a_registry_that_refuses_every_token_costs_one_aws_call(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    image = seed(fake)
    mirror = await make_ecr_mirror(retries=0)
    assert (await get(mirror, f"/v2/team/app/blobs/{image.config}"))[0] == 200
    fake.basic = (ECR_USER, "rotated-elsewhere")  # no token AWS gives us will do now
    fake.reset_log()
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 403
    assert (await resp.json())["errors"][0]["code"] == "DENIED"
    assert moto.calls(GET_TOKEN) == 2  # one refresh for the refusal ...
    assert [r.status for r in fake.log] == [401, 401]  # ... and one retry with it
    # Refused again at once: the fresh token was refused too, so AWS is not asked again.
    for layer in image.layers[1:]:
        resp = await mirror.client.get(f"/v2/team/app/blobs/{layer}", params=FAKE)
        assert resp.status == 403
    assert moto.calls(GET_TOKEN) == 2
    fake.basic = (ECR_USER, ECR_PASSWORD)
    assert (await get(mirror, f"/v2/team/app/blobs/{image.layers[1]}"))[0] == 200
    assert moto.calls(GET_TOKEN) == 2


async def test_aws_unreachable_is_a_fast_503_naming_the_registry(
    fake: FakeRegistry, make_ecr_mirror: MakeEcrMirror
) -> None:
    image = seed(fake)
    mirror = await make_ecr_mirror(endpoint=f"http://127.0.0.1:{closed_port()}", breaker_failures=3)
    for _ in range(3):
        started = time.monotonic()
        resp = await mirror.client.get(f"/v2/team/app/blobs/{image.config}", params=FAKE)
        elapsed = time.monotonic() - started
        error = (await resp.json())["errors"][0]
        assert (resp.status, error["code"]) == (503, "UNAVAILABLE")
        assert error["message"].startswith("no ECR credentials for fake.test: ")
        assert error["detail"] == {"registry": "fake.test"}
        assert elapsed < 2.0, elapsed
    assert fake.count() == 0  # nothing went to the registry without credentials
    # Counted as that registry's failures: its breaker is open, the others' are not.
    assert mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 1
    assert mirror.metric("mirror_upstream_breaker_open", registry="docker.io") == 0
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.config}", params=FAKE)
    assert "fake.test is failing" in (await resp.json())["errors"][0]["message"]


async def test_no_secret_reaches_a_log_line(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    image = seed(fake)
    with capture_logs() as events:
        mirror = await make_ecr_mirror()
        assert (await get(mirror, "/v2/team/app/manifests/v1"))[0] == 200
        fake.fault("challenge", kind="blob", challenge='Basic realm="x"', times=1)
        assert (await get(mirror, f"/v2/team/app/blobs/{image.config}"))[0] == 200
        fake.basic = (ECR_USER, "rotated-elsewhere")
        assert (await get(mirror, f"/v2/team/app/blobs/{image.layers[0]}"))[0] == 403
        await mirror.client.close()  # the shutdown lines too
    names = [e["event"] for e in events]
    assert "ecr_credentials_issued" in names and "ecr_credentials_refused" in names
    assert "request" in names  # the access lines were captured as well
    text = json.dumps(events, default=repr)
    for secret in (TOKEN, ECR_PASSWORD, "not-a-real-secret"):
        assert secret not in text


async def test_start_up_imports_aiobotocore_only_when_ecr_is_configured(
    fake: FakeRegistry, moto: MotoServer, tmp_path: Path
) -> None:
    """Measured in a fresh interpreter: this one has long imported it for the tests."""
    plain = mirror_config(tmp_path / "plain", fake.url)
    ecr = ecr_config(tmp_path, fake, moto.url)
    assert await imports_after_start(plain) == {"aiobotocore": False, "botocore": False}
    assert await imports_after_start(ecr) == {"aiobotocore": True, "botocore": True}


async def imports_after_start(config: Config) -> dict[str, bool]:
    registries = {
        n: {"url": r.url, "aws_region": r.aws_region, "aws_endpoint_url": r.aws_endpoint_url}
        for n, r in config.registries.items()
    }
    script = f"""
import asyncio, json, sys
from types import MappingProxyType
from pathlib import Path
from aiohttp import web
from mirror.app import create_app
from mirror.config import Config, CacheConfig, RegistryConfig
regs = {{n: RegistryConfig(n, **r) for n, r in {registries!r}.items()}}
config = Config(cache=CacheConfig(directory=Path({str(config.cache.directory)!r})),
                registries=MappingProxyType(regs), default_registry="docker.io")
async def main():
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    await runner.cleanup()
asyncio.run(main())
print(json.dumps({{m: m in sys.modules for m in ("aiobotocore", "botocore")}}))
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, bool] = json.loads(out.decode().strip().splitlines()[-1])
    return result
