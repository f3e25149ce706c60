"""Basic credentials for Amazon ECR from GetAuthorizationToken, refreshed well before expiry.

Imported only when some registry has an aws_region (see credentials.open_credentials):
aiobotocore is slow to import. A library rather than hand-written SigV4: the credential
chain (environment, profiles, SSO, instance and container roles, IRSA web identity, with
their own refreshes) is most of the work, and botocore is where AWS keeps it correct.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from mirror.coalesce import SingleFlight
from mirror.config import RegistryConfig, UpstreamConfig
from mirror.upstream.credentials import Credentials
from mirror.upstream.ecr_client import LazyEcrClient
from mirror.upstream.errors import NoCredentials

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

log = structlog.get_logger("mirror.upstream.ecr")

# A token lives 12 h. Asking again with an hour left leaves that hour to ride out an AWS
# or network failure on the old one.
REFRESH_MARGIN = 3600.0
# However soon a token claims to expire (clock skew; moto says 2015), and however often a
# registry refuses them, AWS is asked at most this often per endpoint.
MIN_REFRESH_INTERVAL = 300.0
# After a failed refresh, while the old token is still good: when to try again.
RETRY_INTERVAL = 30.0
# What a registry is called in the region whose tokens it takes (FIPS and China included).
_ECR_HOST = re.compile(r"[0-9]{12}\.dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a token comes from; registries that share it share the token (one token serves
    every registry the AWS principal may pull from)."""

    region: str
    url: str | None

    @classmethod
    def of(cls, registry: RegistryConfig) -> Endpoint:
        assert registry.aws_region is not None, "only ECR registries have an endpoint"
        return cls(registry.aws_region, registry.aws_endpoint_url)


def ecr_host_region(url: str) -> str | None:
    """The region an ECR registry url names in its host; None: the host is not ECR's."""
    match = _ECR_HOST.fullmatch(urlsplit(url).hostname or "")
    return match.group(1) if match else None


def aws_call_timeout(config: UpstreamConfig) -> float:
    """How long one GetAuthorizationToken may take, credential chain (STS, roles) included:
    as long as a registry gets to connect and answer, so a hung AWS is a 503 as fast."""
    return config.connect_timeout + config.header_timeout


class EcrApi(Protocol):
    """The one call made; an aiobotocore ECR client is one."""

    async def get_authorization_token(self) -> Mapping[str, Any]: ...


@dataclass(slots=True)
class _Issued:
    creds: Credentials
    refresh_at: float  # monotonic: ask again from then on
    valid_until: float  # monotonic: the token's own expiry, for riding out a failed refresh


class AwsFailure(Exception):
    """Why no token came, in words safe for a client and a log line (no secrets)."""


def decode_token(token: str) -> Credentials:
    """authorizationToken is base64 of "AWS:<password>"; the password goes out as Basic."""
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
    except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise AwsFailure("GetAuthorizationToken returned an unreadable token") from exc
    if not sep or not user or not password:
        raise AwsFailure("GetAuthorizationToken returned an unreadable token")
    return Credentials(user, password)


def refresh_delay(expires_in: float) -> float:
    """Seconds until a token with `expires_in` seconds left is asked for again."""
    return max(MIN_REFRESH_INTERVAL, expires_in - REFRESH_MARGIN)


def describe_failure(exc: BaseException) -> str:
    """Words for a client's 503 and the log: the kind of failure, never a key or a token."""
    if isinstance(exc, AwsFailure):
        return str(exc)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "no AWS credentials found (environment, profile, instance role or IRSA)"
    if isinstance(exc, CredentialRetrievalError):
        return "the AWS credential provider failed (instance role, IRSA or SSO)"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "an error")
        return f"AWS answered {code} to GetAuthorizationToken"
    if isinstance(exc, BotoConnectionError | HTTPClientError | OSError):
        return f"cannot reach the ECR API ({type(exc).__name__})"
    return f"GetAuthorizationToken failed ({type(exc).__name__})"


class EcrCredentials:
    """A CredentialSource for ECR registries: one token per endpoint, fetched by one AWS
    call however many requests want it, reused until well before it expires. A due refresh
    runs in the background while the token in hand is still valid: only a request with no
    valid token waits for AWS."""

    def __init__(
        self,
        apis: Mapping[Endpoint, EcrApi],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,  # what expiresAt is read by
        *,
        timeout: float = aws_call_timeout(UpstreamConfig()),  # bound of one AWS call
    ) -> None:
        self._apis = apis
        self._clock = clock
        self._wall_clock = wall_clock
        self._timeout = timeout
        self._issued: dict[Endpoint, _Issued] = {}
        self._calls: SingleFlight[Endpoint, _Issued] = SingleFlight("ecr token")
        self._forced: dict[Endpoint, float] = {}  # when a refusal last dropped a token

    async def get(self, registry: RegistryConfig) -> Credentials:
        endpoint = Endpoint.of(registry)
        issued = self._issued.get(endpoint)
        now = self._clock()
        if issued is not None and now < issued.refresh_at:
            return issued.creds
        if issued is not None and now < issued.valid_until:
            # Due, but good for a while yet (an hour, normally): no request waits on AWS, or
            # on a slow credential chain, for a token it does not need yet.
            self._refresh(endpoint)
            return issued.creds
        try:
            # shield: one waiter hanging up must not cancel the call the others wait for
            return (await asyncio.shield(self._refresh(endpoint))).creds
        except AwsFailure as exc:
            raise NoCredentials(
                f"no ECR credentials for {registry.name}: {exc}", registry=registry.name
            ) from exc

    def refused(self, registry: RegistryConfig, creds: Credentials) -> bool:
        endpoint = Endpoint.of(registry)
        issued = self._issued.get(endpoint)
        if issued is None or issued.creds is not creds:
            return True  # another request already dropped or replaced them: get() has news
        now = self._clock()
        last = self._forced.get(endpoint)
        if last is not None and now - last < MIN_REFRESH_INTERVAL:
            return False  # a fresh token was refused too: asking AWS again would not help yet
        self._forced[endpoint] = now
        del self._issued[endpoint]
        log.info("ecr_credentials_refused", registry=registry.name, region=endpoint.region)
        return True

    async def close(self) -> None:
        await self._calls.close()

    def _refresh(self, endpoint: Endpoint) -> asyncio.Task[_Issued]:
        """The one call in flight for `endpoint`, started if there is none. Its own context:
        the call serves every request, and its log lines belong to none of them."""
        return self._calls.launch(endpoint, lambda: self._fetch(endpoint))

    async def _fetch(self, endpoint: Endpoint) -> _Issued:
        started = self._clock()
        try:
            reply = await self._ask(endpoint)
            creds, expires_in = self._read(reply)
        except (BotoCoreError, ClientError, OSError, AwsFailure) as exc:
            reason = describe_failure(exc)
            self._failed(endpoint, started, reason)
            raise AwsFailure(reason) from exc
        delay = refresh_delay(expires_in)
        issued = _Issued(creds, started + delay, started + expires_in)
        self._issued[endpoint] = issued
        log.info(
            "ecr_credentials_issued",
            region=endpoint.region,
            expires_in=round(expires_in),
            refresh_in=round(delay),
        )
        return issued

    async def _ask(self, endpoint: Endpoint) -> Mapping[str, Any]:
        """GetAuthorizationToken within our bound: botocore's own (60 s and retries for the
        STS call behind IRSA) would hang pulls, containerd having no header timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._apis[endpoint].get_authorization_token()
        except TimeoutError as exc:
            raise AwsFailure(f"no answer from AWS within {self._timeout:g}s") from exc

    def _read(self, reply: Mapping[str, Any]) -> tuple[Credentials, float]:
        """(credentials, seconds until they expire) from a GetAuthorizationToken reply."""
        try:
            data = reply["authorizationData"][0]
            token, expires_at = data["authorizationToken"], data["expiresAt"]
            expires_in = float(expires_at.timestamp()) - self._wall_clock()
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise AwsFailure("GetAuthorizationToken returned no usable authorizationData") from exc
        return decode_token(token), expires_in

    def _failed(self, endpoint: Endpoint, now: float, reason: str) -> None:
        """Riding out a failure on a still-valid token: ask again soon, not at every request."""
        current = self._issued.get(endpoint)
        if current is not None and now < current.valid_until:
            current.refresh_at = now + RETRY_INTERVAL
            log.warning(
                "ecr_refresh_failed",
                region=endpoint.region,
                reason=reason,
                valid_for=round(current.valid_until - now),
            )


@asynccontextmanager
async def open_ecr_credentials(
    registries: Iterable[RegistryConfig],
    config: UpstreamConfig,
    session: AioSession | None = None,
) -> AsyncIterator[EcrCredentials]:
    """One ECR client per endpoint, closed with the source. Nothing here waits on AWS or its
    credential chain: the first request for a registry does, within aws_call_timeout."""
    registries = list(registries)
    warn_about_hosts(registries)
    aio_config = AioConfig(
        connect_timeout=config.connect_timeout,
        read_timeout=config.header_timeout,
        # One attempt: a failure must reach the client as a quick 503 (and the breaker),
        # not after botocore's backoff; the next request asks again.
        retries={"total_max_attempts": 1},
        # The service models are read from disk in a thread: clients are made while serving.
        warm_up_loader_caches=True,
    )
    if session is None:
        session = get_session()
        # The default for every client the session makes, the STS one behind IRSA included
        # (a session passed in is its owner's to configure).
        session.set_default_client_config(aio_config)
    apis = {
        endpoint: LazyEcrClient(session, endpoint.region, endpoint.url, aio_config)
        for endpoint in {Endpoint.of(r) for r in registries}
    }
    source = EcrCredentials(apis, timeout=aws_call_timeout(config))
    try:
        yield source
    finally:
        await source.close()
        for api in apis.values():
            await api.close()


def warn_about_hosts(registries: Iterable[RegistryConfig]) -> None:
    """A token is good only in the region it came from: a registry whose host names another
    (or no ECR host at all) would see every one refused. Said once, at start-up."""
    for registry in registries:
        host_region = ecr_host_region(registry.url)
        if host_region != registry.aws_region:
            log.warning(
                "ecr_registry_host_unexpected",
                registry=registry.name,
                host=urlsplit(registry.url).hostname,
                aws_region=registry.aws_region,
                host_region=host_region,
                expected=f"<account>.dkr.ecr.{registry.aws_region}.amazonaws.com",
            )
