"""Private ECR registries: Basic credentials from GetAuthorizationToken on a real moto server,
in front of the fake registry in ECR's Basic mode. AWS calls are counted at moto."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from aiobotocore.session import AioSession
from botocore.exceptions import CredentialRetrievalError
from structlog.testing import capture_logs

from mirror.app import Deps, create_app
from mirror.config import Config, RegistryConfig

from .aws import AWS_SECRET, SwitchedChain, aws_session
from .fakeregistry import FakeRegistry, Image
from .harness import KiB, Mirror, closed_port, mirror_config, random_bytes
from .moto import ECR_PASSWORD, ECR_USER, MotoServer

FAKE = {"ns": "fake.test"}
TOKEN = base64.b64encode(f"{ECR_USER}:{ECR_PASSWORD}".encode()).decode()
GET_TOKEN = "GetAuthorizationToken"

MakeEcrMirror = Callable[..., Awaitable[Mirror]]


def ecr_config(tmp_path: Path, fake: FakeRegistry, endpoint: str, **upstream: Any) -> Config:
    base = mirror_config(tmp_path / "cache", fake.url, **upstream)
    ecr = RegistryConfig("fake.test", fake.url, aws_region="us-east-1", aws_endpoint_url=endpoint)
    return replace(base, registries=MappingProxyType({**base.registries, "fake.test": ecr}))


@pytest.fixture
def make_ecr_mirror(
    aiohttp_client: Any, fake: FakeRegistry, moto: MotoServer, tmp_path: Path
) -> MakeEcrMirror:
    """make_ecr_mirror(endpoint=moto.url, session=dummy keys, **upstream_overrides): fake.test
    is an ECR registry."""

    async def make(
        endpoint: str | None = None, session: AioSession | None = None, **upstream: Any
    ) -> Mirror:
        config = ecr_config(tmp_path, fake, endpoint or moto.url, **upstream)
        app = create_app(config, Deps(aws_session=session or aws_session()))
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


async def test_aws_credentials_that_appear_after_start_up_are_used(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    """Started before there are any (keys not yet in the environment, an instance role still
    coming up): once they appear, the next request finds them, without a restart."""
    image = seed(fake)
    chain = SwitchedChain()
    mirror = await make_ecr_mirror(session=chain.session())
    assert chain.loads == 0  # start-up did not look
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.config}", params=FAKE)
    assert resp.status == 503
    assert (await resp.json())["errors"][0]["message"] == (
        "no ECR credentials for fake.test: "
        "no AWS credentials found (environment, profile, instance role or IRSA)"
    )
    chain.keys = ("AKIDLATER", AWS_SECRET)
    assert (await get(mirror, f"/v2/team/app/blobs/{image.config}"))[0] == 200
    assert (chain.loads, moto.calls(GET_TOKEN)) == (2, 1)


async def test_a_failing_credential_provider_stops_neither_start_up_nor_other_registries(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    """EKS Pod Identity's agent not up yet at node boot: that link of the chain raises."""
    image = fake.add_image("team/app", "v1", [random_bytes(8 * KiB, i) for i in range(2)])
    chain = SwitchedChain()
    chain.error = CredentialRetrievalError(provider="container-role", error_msg="agent not up")
    async with asyncio.timeout(5):
        mirror = await make_ecr_mirror(session=chain.session())
    # docker.io (the same fake, no ECR about it) is served as ever.
    resp = await mirror.client.get("/v2/team/app/manifests/v1")
    assert (resp.status, await resp.read()) == (200, image.manifest)
    fake.basic = (ECR_USER, ECR_PASSWORD)
    fake.reset_log()
    resp = await mirror.client.get(f"/v2/team/app/blobs/{image.layers[0]}", params=FAKE)
    assert resp.status == 503
    assert (await resp.json())["errors"][0]["message"] == (
        "no ECR credentials for fake.test: "
        "the AWS credential provider failed (instance role, IRSA or SSO)"
    )
    assert fake.count() == 0
    chain.error, chain.keys = None, ("AKIDLATER", AWS_SECRET)  # the agent is up
    assert (await get(mirror, f"/v2/team/app/blobs/{image.layers[0]}"))[0] == 200
    assert moto.calls(GET_TOKEN) == 1


async def test_a_hung_credential_chain_is_a_503_within_the_upstream_timeouts(
    fake: FakeRegistry, moto: MotoServer, make_ecr_mirror: MakeEcrMirror
) -> None:
    """STS behind IRSA, or an instance metadata service, that never answers: botocore's own
    bounds are a minute and more; a pull is answered within connect + header timeout."""
    image = seed(fake)
    chain = SwitchedChain()
    chain.gate = asyncio.Event()  # never set
    async with asyncio.timeout(5):
        mirror = await make_ecr_mirror(
            session=chain.session(), connect_timeout=0.2, header_timeout=0.3
        )
        started = time.monotonic()
        resp = await mirror.client.get(f"/v2/team/app/blobs/{image.config}", params=FAKE)
        elapsed = time.monotonic() - started
    error = (await resp.json())["errors"][0]
    assert (resp.status, error["message"], error["detail"]) == (
        503,
        "no ECR credentials for fake.test: no answer from AWS within 0.5s",
        {"registry": "fake.test"},
    )
    assert 0.5 <= elapsed < 2.0, elapsed
    chain.gate, chain.keys = None, ("AKIDLATER", AWS_SECRET)  # the chain answers again
    assert (await get(mirror, f"/v2/team/app/blobs/{image.config}"))[0] == 200


async def test_a_registry_host_outside_its_aws_region_is_warned_of_once(
    fake: FakeRegistry, make_ecr_mirror: MakeEcrMirror
) -> None:
    """fake.test's url is 127.0.0.1, no ECR host in us-east-1: its tokens could be refused."""
    image = seed(fake)
    with capture_logs() as events:
        mirror = await make_ecr_mirror()
        at_start = len(events)
        assert (await get(mirror, "/v2/team/app/manifests/v1"))[0] == 200
        assert (await get(mirror, f"/v2/team/app/blobs/{image.config}"))[0] == 200
    warned = {
        i: (e["registry"], e["host"], e["aws_region"])
        for i, e in enumerate(events) if e["event"] == "ecr_registry_host_unexpected"
    }  # fmt: skip
    assert list(warned.values()) == [("fake.test", "127.0.0.1", "us-east-1")]
    assert max(warned) < at_start  # said at start-up, and by no request


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
    for secret in (TOKEN, ECR_PASSWORD, AWS_SECRET):
        assert secret not in text


async def test_no_secret_reaches_stdout_or_stderr_at_debug_level(moto: MotoServer) -> None:
    """What capture_logs cannot see: the real handlers, botocore's and aiobotocore's own
    loggers (its DEBUG lines hold signed headers and response bodies), asyncio's, warnings.
    A fresh interpreter logs as the mirror does at --log-level debug and asks moto once."""
    script = f"""
import asyncio
from mirror.config import RegistryConfig, UpstreamConfig
from mirror.log import configure_logging
from mirror.upstream.issuers import open_credentials

configure_logging("debug")
host = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
ecr = RegistryConfig(host, "https://" + host, aws_region="us-east-1",
                     aws_endpoint_url={moto.url!r})

async def main():
    async with open_credentials({{host: ecr}}, UpstreamConfig()) as source:
        creds = await source.get(ecr)
    # Compared here, not printed: a failure shows this line, never the values.
    assert creds.basic() == "Basic {TOKEN}"

asyncio.run(main(), debug=True)
"""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environ.update(
        AWS_ACCESS_KEY_ID="AKIDTESTING",
        AWS_SECRET_ACCESS_KEY=AWS_SECRET,
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=environ,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = (stream.decode() for stream in await proc.communicate())
    assert proc.returncode == 0, err
    assert moto.calls(GET_TOKEN) == 1
    assert '"event": "ecr_credentials_issued"' in out  # the logging was live
    for secret in (ECR_PASSWORD, TOKEN, AWS_SECRET):
        assert secret not in out and secret not in err


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
from mirror.app import Deps, create_app
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
