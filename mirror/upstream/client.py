"""HTTP to origin registries: auth challenges, redirects, deadlines, retries, circuit breaking."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
import structlog
from yarl import URL

from mirror.config import RegistryConfig, UpstreamConfig
from mirror.metrics import Metrics, status_class
from mirror.oci.mediatypes import UPSTREAM_ACCEPT
from mirror.oci.ratelimit import parse_ratelimit_remaining
from mirror.upstream.authorize import Authorizer
from mirror.upstream.breaker import CircuitBreaker, Refusal, Verdict
from mirror.upstream.credentials import CredentialSource, StaticCredentials
from mirror.upstream.errors import (
    NoCredentials,
    UpstreamBodyError,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnavailable,
    parse_retry_after,
)
from mirror.upstream.redirects import RedirectPolicy, shown
from mirror.upstream.retry import RetryPolicy
from mirror.upstream.session import refused_address
from mirror.upstream.tokens import TokenCache

log = structlog.get_logger("mirror.upstream")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
# Registries send blobs to CDNs and object stores; a manifest, a tag list or a tag's HEAD
# comes from the registry itself, or a third party would choose what a tag means.
_MAY_LEAVE = frozenset({"blob", "blob_head"})
_KIND_NAMES = {
    "manifest": "manifest GETs", "manifest_head": "manifest HEADs", "blob": "blob GETs",
    "blob_head": "blob HEADs", "tags": "tag lists",
}  # fmt: skip
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # Distribution refuses larger manifests too
# Below this many pulls left, every change of Docker Hub's count is logged (at most one line
# per pull); above it only the first count seen is, so a healthy budget stays quiet.
RATELIMIT_LOW = 20


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: str | None
    media_type: str
    size: int | None


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    body: bytes
    media_type: str
    digest: str | None  # Docker-Content-Digest, when the registry sent one


@dataclass(frozen=True, slots=True)
class TagList:
    body: bytes
    link: str | None  # the registry's `Link: <...>; rel="next"`, pointing at its own path


@dataclass(slots=True)
class BlobBody:
    """An open blob response (a RangeBody); `offset` is where its first byte sits in the blob."""

    response: aiohttp.ClientResponse
    offset: int
    total: int | None
    ranged: bool
    received: Callable[[int], None]  # told of every body byte, for the upstream bytes metric

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self.response.content.iter_any():
                self.received(len(data))
                yield data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamBodyError(f"body broke off: {type(exc).__name__}: {exc}") from exc

    def release(self) -> None:
        self.response.release()

    def close(self) -> None:
        self.response.close()


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes 0-99/1000` -> (0, 99, 1000); total None for `*`."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, last = span.partition("-")
    try:
        return int(first), int(last), (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


def request_key(name: str, suffix: str) -> tuple[str, ...]:
    """Which request this is, for the breaker: content by digest is one request under any
    repository name and any Range (so a blob's pieces are one), a tag is its repository's."""
    path = suffix.partition("?")[0]
    reference = path.rpartition("/")[2]
    return (reference,) if ":" in reference else (name, path)


class _Unreachable(Exception):
    """No connection to the registry's own host (refused, no route, no DNS answer, TLS, or
    none in connect_timeout): no request can cause that, unlike a failure after it was sent."""

    def __init__(self, cause: BaseException) -> None:
        self.timed_out = isinstance(cause, TimeoutError)
        super().__init__(type(cause).__name__)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    """The whole body (read(n) returns only what is buffered: a body of several segments
    would be cut short), refusing anything larger than `cap`."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > cap:
            raise UpstreamError(502, f"{what} larger than {cap} bytes")
    return bytes(body)


class RegistryClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        registries: Mapping[str, RegistryConfig],
        config: UpstreamConfig,
        tokens: TokenCache,
        breaker: CircuitBreaker,
        metrics: Metrics,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,  # what an HTTP-date Retry-After is read by
        credentials: CredentialSource | None = None,  # None: each registry's username/password
    ) -> None:
        self._session = session
        self._registries = registries
        self._config = config
        self._redirects = RedirectPolicy.of(
            (r.url for r in registries.values()), config.redirect_allow
        )
        self._authorizer = Authorizer(
            tokens, credentials or StaticCredentials(), self._follow, self._redirects
        )
        self._breaker = breaker
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._metrics = metrics
        self._sleep = sleep
        self._retry = RetryPolicy.of(config)
        self._wall_clock = wall_clock
        self._ratelimits: dict[str, int] = {}  # last ratelimit-remaining seen, per registry
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
        )

    # -- the registry API, as the services use it -------------------------------------------

    async def head_manifest(
        self,
        registry: str,
        name: str,
        reference: str,
        *,
        retry: bool = True,
        attempt_timeout: float | None = None,
    ) -> ManifestHead:
        """retry=False when the caller has a stale answer to fall back on: one try, then that.
        `attempt_timeout`: how long that answer may wait for this one (see `open`)."""
        resp = await self.open(
            registry, name, f"manifests/{reference}", "HEAD",
            {"Accept": UPSTREAM_ACCEPT}, kind="manifest_head", retry=retry,
            attempt_timeout=attempt_timeout,
        )  # fmt: skip
        resp.release()
        return ManifestHead(
            resp.headers.get("Docker-Content-Digest"),
            resp.headers.get("Content-Type", "").split(";")[0].strip(),
            resp.content_length,
        )

    async def get_manifest(
        self, registry: str, name: str, reference: str, accept: str = UPSTREAM_ACCEPT
    ) -> FetchedManifest:
        resp = await self.open(
            registry, name, f"manifests/{reference}", "GET", {"Accept": accept}, kind="manifest"
        )
        try:
            if (resp.content_length or 0) > MAX_MANIFEST_BYTES:
                raise UpstreamError(502, "manifest larger than 4 MiB")
            body = await _read_capped(resp, MAX_MANIFEST_BYTES, "manifest")
            if resp.content_length is not None and len(body) != resp.content_length:
                raise UpstreamUnavailable("manifest body ended early")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"manifest body failed: {type(exc).__name__}") from exc
        finally:
            resp.release()
        self.record_bytes(registry, len(body))
        return FetchedManifest(
            body,
            resp.headers.get("Content-Type", "").split(";")[0].strip(),
            resp.headers.get("Docker-Content-Digest"),
        )

    async def open_blob(
        self, registry: str, name: str, digest: str, start: int | None = None,
        end: int | None = None, *, retry: bool = True,
    ) -> BlobBody:  # fmt: skip
        """GET a blob, or the bytes start..end (inclusive; end None = to the end).
        retry=False for a caller that retries pieces itself: every attempt at any piece of
        one blob is the same request to the breaker, so a blob failing often counts once."""
        headers = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        resp = await self.open(
            registry, name, f"blobs/{digest}", "GET", headers, kind="blob", retry=retry
        )
        received = self._metrics.upstream_bytes.labels(registry).inc  # per chunk: bound once
        if resp.status == 206:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None:
                resp.close()
                raise UpstreamError(502, "206 without a usable Content-Range")
            return BlobBody(resp, span[0], span[2], True, received)
        return BlobBody(resp, 0, resp.content_length, False, received)

    async def list_tags(self, registry: str, name: str, query: Mapping[str, str]) -> TagList:
        suffix = "tags/list"
        if query:
            # Encoded: the values come from the client and go into an already-encoded URL.
            suffix += "?" + urlencode({k: v for k, v in query.items() if k in ("n", "last")})
        resp = await self.open(registry, name, suffix, "GET", {}, kind="tags")
        try:
            body = await _read_capped(resp, MAX_MANIFEST_BYTES, "tag list")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"tag list body from {registry} failed: {type(exc).__name__}", registry=registry
            ) from exc
        finally:
            resp.release()
        return TagList(body, resp.headers.get("Link"))

    def record_bytes(self, registry: str, count: int) -> None:
        self._metrics.upstream_bytes.labels(registry).inc(count)

    async def close(self) -> None:
        """Shutdown: probes still out are cancelled (before the session they use is closed)."""
        probes = list(self._probes.values())
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    # -- plumbing ----------------------------------------------------------------------------

    async def open(
        self,
        registry: str,
        name: str,
        suffix: str,
        method: str,
        headers: Mapping[str, str],
        *,
        kind: str,
        retry: bool = True,
        attempt_timeout: float | None = None,
    ) -> aiohttp.ClientResponse:
        """A 2xx response (the caller releases it), or UpstreamError / UpstreamUnavailable /
        UpstreamRefused.

        Connection failures and 5xx are retried with jittered backoff (every request here is
        idempotent); 429 and deadlines are not: they fail fast, so the services can serve
        stale instead of making clients wait. The breaker counts a failing request once,
        however many attempts it took (see CircuitBreaker); a 429 holds only this `kind`.

        `attempt_timeout` bounds each attempt, token fetch and redirects included, for a
        caller that cannot wait as long as the configured deadlines. It must be given here,
        not by wrapping the call in asyncio.timeout: a cancelled call cannot count its
        timeout as a failure, and a silent registry would then never open the breaker.
        """
        reg = self._registries[registry]
        url = URL(f"{reg.url}/v2/{name}/{suffix}", encoded=True)
        if reg.is_mirror:
            url = url.update_query(ns=registry)
        key = request_key(name, suffix)
        attempts = self._retry.retries + 1 if retry else 1
        for attempt in range(attempts):
            refusal = self._breaker.admit(registry, kind)
            if refusal is not None:
                raise self._refusal(registry, kind, refusal)
            try:
                async with asyncio.timeout(attempt_timeout):
                    resp = await self._authorizer.send(
                        reg, name, method, url, headers, may_leave=kind in _MAY_LEAVE
                    )
            except UpstreamRefused as exc:
                self._metrics.upstream_requests.labels(registry, kind, "refused").inc()
                self._answered(registry, kind)  # alive; where it points is the trouble
                exc.registry = registry
                raise
            except _Unreachable as exc:
                self._failed(registry, kind, None, "timeout" if exc.timed_out else "error")
                # Waiting out connect_timeout again would keep the client waiting too long.
                if attempt + 1 < attempts and not exc.timed_out:
                    await self._sleep(self._retry.delay(attempt + 1))
                    continue
                raise UpstreamUnavailable(
                    f"{registry} unreachable: {exc}", registry=registry,
                    unreachable=not exc.timed_out,
                ) from exc  # fmt: skip
            except TimeoutError as exc:
                self._failed(registry, kind, key, "timeout")
                raise UpstreamUnavailable(
                    f"{registry} sent no response headers in time", registry=registry
                ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                self._failed(registry, kind, key, "error")
                if attempt + 1 < attempts:
                    await self._sleep(self._retry.delay(attempt + 1))
                    continue
                raise UpstreamUnavailable(
                    f"{registry} unreachable: {type(exc).__name__}",
                    registry=registry,
                    unreachable=True,
                ) from exc
            except (UpstreamError, UpstreamUnavailable) as exc:  # token endpoint, credentials
                exc.registry = registry
                if isinstance(exc, NoCredentials):  # nothing to this registry can work
                    self._failed(registry, kind, None, "error")
                elif exc.transient:
                    self._failed(registry, kind, key, "error")
                else:
                    self._answered(registry, kind)  # it answered: the registry is alive
                raise
            status = resp.status
            self._observe(registry, kind, resp)
            if status < 300:
                self._answered(registry, kind)
                return resp
            error = await self._error_from(resp, registry)
            if status == 429:
                self._metrics.upstream_throttled.labels(registry).inc()
                self._breaker.throttled(registry, kind, error.retry_after)
                log.warning(
                    "upstream_throttled", registry=registry, kind=kind,
                    hold=round(self._breaker.held_for(registry, kind), 1),
                )  # fmt: skip
                raise error
            if status >= 500:
                self._judge(registry, self._breaker.failure(registry, kind, key))
                if attempt + 1 < attempts:
                    await self._sleep(self._retry.delay(attempt + 1, error.retry_after))
                    continue
                raise error
            self._answered(registry, kind)  # a 4xx is a live registry answering
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    def _refusal(self, registry: str, kind: str, refusal: Refusal) -> UpstreamUnavailable:
        wait = math.ceil(refusal.retry_in)
        if refusal.held:
            message = (
                f"{registry} asked the mirror to wait (429 on {_KIND_NAMES.get(kind, kind)}); "
                f"next try in {wait}s"
            )
        else:
            message = f"{registry} is failing; next try in {wait}s"
        return UpstreamUnavailable(message, registry=registry, retry_after=refusal.retry_in)

    def _answered(self, registry: str, kind: str) -> None:
        if self._breaker.success(registry, kind):
            log.info("upstream_breaker_closed", registry=registry)

    def _failed(self, registry: str, kind: str, key: tuple[str, ...] | None, status: str) -> None:
        self._metrics.upstream_requests.labels(registry, kind, status).inc()
        self._judge(registry, self._breaker.failure(registry, kind, key))

    def _judge(self, registry: str, verdict: Verdict) -> None:
        if verdict is Verdict.OPENED:
            log.warning(
                "upstream_breaker_opened", registry=registry, reason="unreachable",
                cooldown=self._config.breaker_cooldown,
            )  # fmt: skip
        elif verdict is Verdict.PROBE and registry not in self._probes:
            # Its own task: no request waits for the verdict, and none cancels it by leaving.
            task = asyncio.create_task(
                self._probe(registry), name=f"probe {registry}", context=contextvars.Context()
            )
            self._probes[registry] = task
            task.add_done_callback(lambda _: self._probes.pop(registry, None))

    async def _probe(self, registry: str) -> None:
        """Is the origin down, or only the requests that failed (a manifest it answers 500
        to, a path it cannot serve)? `GET /v2/` needs neither a token nor storage: any answer
        below 500 (a 401 too) is a live registry."""
        url = URL(f"{self._registries[registry].url}/v2/")
        status: int | None = None
        try:
            async with asyncio.timeout(self._config.header_timeout):
                async with self._session.get(
                    url, allow_redirects=False, timeout=self._timeout
                ) as resp:
                    status = resp.status
        except (aiohttp.ClientError, OSError):  # TimeoutError is an OSError
            pass
        self._metrics.upstream_requests.labels(registry, "ping", status_class(status)).inc()
        if self._breaker.probed(registry, status is not None and status < 500):
            log.warning(
                "upstream_breaker_opened", registry=registry, reason="probe_failed",
                probe_status=status, cooldown=self._config.breaker_cooldown,
            )  # fmt: skip

    def _observe(self, registry: str, kind: str, resp: aiohttp.ClientResponse) -> None:
        self._metrics.upstream_requests.labels(registry, kind, status_class(resp.status)).inc()
        remaining = parse_ratelimit_remaining(resp.headers.get("ratelimit-remaining"))
        if remaining is not None:
            self._metrics.ratelimit_remaining.labels(registry).set(remaining)
            self._note_ratelimit(registry, remaining, resp.headers.get("ratelimit-limit"))

    def _note_ratelimit(self, registry: str, remaining: int, limit: str | None) -> None:
        """Operators grep logs, not only dashboards, when pulls start failing with 429."""
        last = self._ratelimits.get(registry)
        self._ratelimits[registry] = remaining
        if last is not None and (remaining == last or remaining >= RATELIMIT_LOW):
            return
        log.log(
            logging.WARNING if remaining < RATELIMIT_LOW else logging.INFO,
            "upstream_ratelimit",
            registry=registry,
            remaining=remaining,
            limit=parse_ratelimit_remaining(limit),
        )

    async def _error_from(self, resp: aiohttp.ClientResponse, registry: str) -> UpstreamError:
        code = message = None
        try:
            if resp.method != "HEAD":
                doc = await resp.json(content_type=None)
                first = (doc.get("errors") or [{}])[0]
                code, message = first.get("code"), first.get("message")
        except Exception:  # noqa: BLE001 - an unreadable error body still has its status
            pass
        finally:
            resp.release()
        return UpstreamError(
            resp.status,
            message or f"upstream answered {resp.status}",
            code=code,
            retry_after=parse_retry_after(resp.headers.get("Retry-After"), self._wall_clock()),
            registry=registry,
        )

    async def _follow(
        self, method: str, url: URL, headers: dict[str, str], *, may_leave: bool
    ) -> aiohttp.ClientResponse:
        """Send, following redirects by hand: the registry's Authorization header never goes
        to another host (presigned CDN and S3 URLs reject it, and it must not leak), and a
        redirect goes only where RedirectPolicy lets it; `may_leave`: to another host at all."""
        first = url  # the registry's: where a redirect may always lead back to
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                async with asyncio.timeout(self._config.header_timeout):
                    resp = await self._session.request(
                        method, url, headers=headers, allow_redirects=False, timeout=self._timeout
                    )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                refused = refused_address(exc)
                if refused is not None:
                    raise UpstreamRefused(f"redirected to {shown(url)}: {refused}") from None
                if url.origin() == first.origin():
                    raise _Unreachable(exc) from exc
                raise
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            try:
                target = url.join(URL(location, encoded=True))
            except ValueError:
                raise UpstreamRefused("redirected to an unreadable Location") from None
            reason = self._redirects.refusal(first, target, may_leave=may_leave)
            if reason is not None:
                raise UpstreamRefused(f"redirected to {shown(target)}: {reason}")
            if target.origin() != url.origin():
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise UpstreamError(502, "too many redirects")
