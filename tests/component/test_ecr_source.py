"""The ECR credential source alone: an in-memory GetAuthorizationToken and a clock the test
moves, for what moto cannot show (a 12 h lifetime, a refresh that fails in time, expiry)."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from structlog.testing import capture_logs

from mirror.config import RegistryConfig, UpstreamConfig
from mirror.upstream.credentials import Credentials
from mirror.upstream.ecr import (
    MIN_REFRESH_INTERVAL,
    RETRY_INTERVAL,
    EcrCredentials,
    Endpoint,
    open_ecr_credentials,
)
from mirror.upstream.errors import UpstreamUnavailable

from .aws import SwitchedChain

HOUR = 3600.0
EU = RegistryConfig("1.dkr.ecr.eu-west-1.amazonaws.com", "https://e", aws_region="eu-west-1")
EU_TOO = RegistryConfig("2.dkr.ecr.eu-west-1.amazonaws.com", "https://f", aws_region="eu-west-1")
US = RegistryConfig("1.dkr.ecr.us-east-1.amazonaws.com", "https://u", aws_region="us-east-1")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_800_000_000.0 + self.now


class FakeEcr:
    """Issues pw-1, pw-2, ... each living `lifetime` seconds; can fail or wait at a gate."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls = 0
        self.lifetime = 12 * HOUR
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None

    async def get_authorization_token(self) -> dict[str, Any]:
        self.calls += 1
        call = self.calls
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        token = base64.b64encode(f"AWS:pw-{call}".encode()).decode()
        expires = datetime.fromtimestamp(self.clock.wall() + self.lifetime, UTC)
        return {"authorizationData": [{"authorizationToken": token, "expiresAt": expires}]}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api(clock: Clock) -> FakeEcr:
    return FakeEcr(clock)


@pytest.fixture
def source(clock: Clock, api: FakeEcr) -> EcrCredentials:
    apis = {Endpoint.of(EU): api, Endpoint.of(US): FakeEcr(clock)}
    return EcrCredentials(apis, clock.monotonic, clock.wall)


async def settled() -> None:
    """Lets a background refresh against FakeEcr (no gate) run to its end."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_token_is_used_until_an_hour_before_it_expires(
    clock: Clock, api: FakeEcr, source: EcrCredentials
) -> None:
    assert await source.get(EU) == Credentials("AWS", "pw-1")
    clock.now = 11 * HOUR - 1
    assert await source.get(EU) == Credentials("AWS", "pw-1")
    assert await source.get(EU_TOO) == Credentials("AWS", "pw-1")  # same endpoint, same token
    await settled()
    assert api.calls == 1
    clock.now = 11 * HOUR
    assert await source.get(EU) == Credentials("AWS", "pw-1")  # and a refresh has started
    await settled()
    assert await source.get(EU) == Credentials("AWS", "pw-2")
    assert api.calls == 2


async def test_a_due_refresh_runs_behind_requests_while_the_old_token_is_valid(
    clock: Clock, api: FakeEcr, source: EcrCredentials
) -> None:
    await source.get(EU)
    clock.now = 11 * HOUR  # due, and valid for an hour yet
    api.gate = asyncio.Event()  # AWS (or STS behind the credential chain) slow
    async with asyncio.timeout(1):  # none of them waits for it
        results = await asyncio.gather(*(source.get(EU) for _ in range(50)))
    assert set(results) == {Credentials("AWS", "pw-1")}
    assert api.calls == 2  # one refresh, shared
    # Still no answer when the old token expires: from then on a request waits, for the
    # same call.
    clock.now = 12 * HOUR
    waiter = asyncio.create_task(source.get(EU))
    await settled()
    assert not waiter.done()
    api.gate.set()
    assert await waiter == Credentials("AWS", "pw-2")
    assert api.calls == 2


async def test_a_hung_aws_call_is_cut_at_the_timeout(clock: Clock, api: FakeEcr) -> None:
    api.gate = asyncio.Event()  # never set: AWS, or the credential chain, never answers
    source = EcrCredentials({Endpoint.of(EU): api}, clock.monotonic, clock.wall, timeout=0.05)
    with pytest.raises(UpstreamUnavailable) as caught:
        async with asyncio.timeout(5):  # the test's own bound: the source must have one
            await source.get(EU)
    assert str(caught.value) == f"no ECR credentials for {EU.name}: no answer from AWS within 0.05s"
    # The next request asks anew: the cut call left nothing behind to wait on.
    api.gate = None
    assert await source.get(EU) == Credentials("AWS", "pw-2")


async def test_a_failed_refresh_rides_on_the_old_token_and_retries_later(
    clock: Clock, api: FakeEcr, source: EcrCredentials
) -> None:
    await source.get(EU)
    api.fail = EndpointConnectionError(endpoint_url="https://api.ecr.eu-west-1.amazonaws.com")
    clock.now = 11 * HOUR
    with capture_logs() as events:
        assert await source.get(EU) == Credentials("AWS", "pw-1")
        await settled()
    assert [e["event"] for e in events] == ["ecr_refresh_failed"]
    assert events[0]["valid_for"] == HOUR
    clock.now += RETRY_INTERVAL - 1
    assert await source.get(EU) == Credentials("AWS", "pw-1")
    await settled()
    assert api.calls == 2  # not one call per request while AWS is down
    clock.now += 1
    api.fail = None
    assert await source.get(EU) == Credentials("AWS", "pw-1")  # the retry runs behind it
    await settled()
    assert await source.get(EU) == Credentials("AWS", "pw-3")


async def test_no_token_and_aws_failing_is_unavailable_naming_the_registry(
    clock: Clock, api: FakeEcr, source: EcrCredentials
) -> None:
    await source.get(EU)
    api.fail = EndpointConnectionError(endpoint_url="https://api.ecr.eu-west-1.amazonaws.com")
    clock.now = 12 * HOUR  # expired: nothing to ride on
    with pytest.raises(UpstreamUnavailable) as caught:
        await source.get(EU)
    assert caught.value.registry == EU.name
    assert str(caught.value) == (
        f"no ECR credentials for {EU.name}: cannot reach the ECR API (EndpointConnectionError)"
    )


async def test_concurrent_gets_share_one_call_that_a_hang_up_does_not_cancel(
    api: FakeEcr, source: EcrCredentials
) -> None:
    api.gate = asyncio.Event()
    waiters = [asyncio.create_task(source.get(EU)) for _ in range(20)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # one client hangs up
    api.gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert set(results) == {Credentials("AWS", "pw-1")}
    assert api.calls == 1


async def test_a_refusal_forces_one_refresh_per_interval(
    clock: Clock, api: FakeEcr, source: EcrCredentials
) -> None:
    first = await source.get(EU)
    assert source.refused(EU, first) is True
    second = await source.get(EU)
    assert (second, api.calls) == (Credentials("AWS", "pw-2"), 2)
    # Another request that sent the first pair learns of the second without a call.
    assert source.refused(EU, first) is True
    assert await source.get(EU) is second
    # The fresh pair refused too: AWS is not asked again until the interval has passed.
    assert source.refused(EU, second) is False
    assert await source.get(EU) is second
    clock.now += MIN_REFRESH_INTERVAL
    assert source.refused(EU, second) is True
    assert await source.get(EU) == Credentials("AWS", "pw-3")


async def test_close_cancels_a_call_in_flight(api: FakeEcr, source: EcrCredentials) -> None:
    api.gate = asyncio.Event()
    waiter = asyncio.create_task(source.get(EU))
    await asyncio.sleep(0)
    await source.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter


def ecr_registry(host: str, aws_region: str = "eu-west-1") -> RegistryConfig:
    return RegistryConfig(host, f"https://{host}", aws_region=aws_region)


async def test_opening_asks_no_aws_credentials_and_warns_of_hosts_in_another_region() -> None:
    chain = SwitchedChain()
    chain.gate = asyncio.Event()  # a chain that never answers (a pod identity agent not up)
    good = ecr_registry("123456789012.dkr.ecr.eu-west-1.amazonaws.com")
    fips = ecr_registry("123456789012.dkr.ecr-fips.eu-west-1.amazonaws.com")
    china = ecr_registry("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", "cn-north-1")
    other_region = ecr_registry("123456789012.dkr.ecr.us-east-1.amazonaws.com")
    stand_in = RegistryConfig("ecr.internal", "https://ecr.internal:5000", aws_region="eu-west-1")
    with capture_logs() as events:
        async with (
            asyncio.timeout(5),
            open_ecr_credentials(
                [good, fips, china, other_region, stand_in], UpstreamConfig(), chain.session()
            ),
        ):
            pass
    assert chain.loads == 0  # start-up neither waited on the chain nor could fail by it
    warned = [e for e in events if e["event"] == "ecr_registry_host_unexpected"]
    assert [(e["registry"], e["host"], e["host_region"]) for e in warned] == [
        (other_region.name, other_region.name, "us-east-1"),
        (stand_in.name, "ecr.internal", None),
    ]
    assert {e["log_level"] for e in warned} == {"warning"}
    assert {e["aws_region"] for e in warned} == {"eu-west-1"}
