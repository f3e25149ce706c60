"""HTTP to origin registries: auth challenges, redirects, deadlines, retries, circuit breaking."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
import structlog
from yarl import URL

from mirror.config import RegistryConfig, UpstreamConfig
from mirror.metrics import Metrics, status_class
from mirror.oci.mediatypes import UPSTREAM_ACCEPT
from mirror.oci.ratelimit import parse_ratelimit_remaining
from mirror.upstream.auth import Challenge, parse_challenges, pull_scope
from mirror.upstream.breaker import CircuitBreaker
from mirror.upstream.errors import UpstreamError, UpstreamUnavailable
from mirror.upstream.tokens import Credentials, TokenCache

log = structlog.get_logger("mirror.upstream")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # Distribution refuses larger manifests too


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


@dataclass(slots=True)
class BlobBody:
    """An open blob response; `offset` is where its first byte sits in the blob."""

    response: aiohttp.ClientResponse
    offset: int
    total: int | None
    ranged: bool

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


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    """The whole body (read(n) returns only what is buffered: a body of several segments
    would be cut short), refusing anything larger than `cap`."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > cap:
            raise UpstreamError(502, f"{what} larger than {cap} bytes")
    return bytes(body)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP-date: rare from registries; fall back to our own backoff


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
    ) -> None:
        self._session = session
        self._registries = registries
        self._config = config
        self._tokens = tokens
        self._breaker = breaker
        self._metrics = metrics
        self._sleep = sleep
        self._challenges: dict[str, Challenge] = {}  # last challenge seen, per registry
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
        )

    # -- the registry API, as the services use it -------------------------------------------

    async def head_manifest(
        self, registry: str, name: str, reference: str, *, retry: bool = True
    ) -> ManifestHead:
        """retry=False when the caller has a stale answer to fall back on: one try, then that."""
        resp = await self.open(
            registry, name, f"manifests/{reference}", "HEAD",
            {"Accept": UPSTREAM_ACCEPT}, kind="manifest_head", retry=retry,
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
        end: int | None = None,
    ) -> BlobBody:  # fmt: skip
        """GET a blob, or the bytes start..end (inclusive; end None = to the end)."""
        headers = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        resp = await self.open(registry, name, f"blobs/{digest}", "GET", headers, kind="blob")
        if resp.status == 206:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None:
                resp.close()
                raise UpstreamError(502, "206 without a usable Content-Range")
            return BlobBody(resp, span[0], span[2], True)
        return BlobBody(resp, 0, resp.content_length, False)

    async def get_tags(self, registry: str, name: str, query: Mapping[str, str]) -> bytes:
        suffix = "tags/list"
        if query:
            # Encoded: the values come from the client and go into an already-encoded URL.
            suffix += "?" + urlencode({k: v for k, v in query.items() if k in ("n", "last")})
        resp = await self.open(registry, name, suffix, "GET", {}, kind="tags")
        try:
            return await _read_capped(resp, MAX_MANIFEST_BYTES, "tag list")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"tag list body failed: {type(exc).__name__}") from exc
        finally:
            resp.release()

    def record_bytes(self, registry: str, count: int) -> None:
        self._metrics.upstream_bytes.labels(registry).inc(count)

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
    ) -> aiohttp.ClientResponse:
        """A 2xx response (the caller releases it), or UpstreamError / UpstreamUnavailable.

        Connection failures and 5xx are retried with jittered backoff (every request here is
        idempotent); 429 and deadlines are not: they open the breaker and fail fast, so the
        services can serve stale instead of making clients wait.
        """
        reg = self._registries[registry]
        url = URL(f"{reg.url}/v2/{name}/{suffix}", encoded=True)
        if reg.is_mirror:
            url = url.update_query(ns=registry)
        attempts = self._config.retries + 1 if retry else 1
        for attempt in range(attempts):
            if self._breaker.is_open(registry):
                raise UpstreamUnavailable(
                    f"{registry} is failing; next try in {self._breaker.retry_in(registry):.0f}s"
                )
            try:
                resp = await self._authorized(reg, name, method, url, headers)
            except TimeoutError as exc:
                self._failed(registry, kind, "timeout")
                raise UpstreamUnavailable(f"{registry} sent no response headers in time") from exc
            except (aiohttp.ClientError, OSError) as exc:
                self._failed(registry, kind, "error")
                if attempt + 1 < attempts:
                    await self._sleep(self._backoff(attempt))
                    continue
                raise UpstreamUnavailable(f"{registry} unreachable: {type(exc).__name__}") from exc
            status = resp.status
            self._observe(registry, kind, resp)
            if status < 300:
                self._breaker.success(registry)
                return resp
            error = await self._error_from(resp)
            if status == 429:
                self._metrics.upstream_throttled.labels(registry).inc()
                self._breaker.failure(registry, hold_for=error.retry_after)
                raise error
            if status >= 500:
                self._breaker.failure(registry)
                if attempt + 1 < attempts:
                    await self._sleep(min(error.retry_after or 0.0, 2.0) or self._backoff(attempt))
                    continue
                raise error
            self._breaker.success(registry)  # a 4xx is a live registry answering
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        return (0.1 * 2.0**attempt) * (0.5 + random.random())

    def _failed(self, registry: str, kind: str, status: str) -> None:
        self._metrics.upstream_requests.labels(registry, kind, status).inc()
        self._breaker.failure(registry)

    def _observe(self, registry: str, kind: str, resp: aiohttp.ClientResponse) -> None:
        self._metrics.upstream_requests.labels(registry, kind, status_class(resp.status)).inc()
        remaining = parse_ratelimit_remaining(resp.headers.get("ratelimit-remaining"))
        if remaining is not None:
            self._metrics.ratelimit_remaining.labels(registry).set(remaining)

    async def _error_from(self, resp: aiohttp.ClientResponse) -> UpstreamError:
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
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )

    async def _authorized(
        self, reg: RegistryConfig, name: str, method: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        creds = Credentials(reg.username, reg.password or "") if reg.username else None
        scope = pull_scope(name)
        sent = dict(headers)
        sent.setdefault("Accept-Encoding", "identity")  # exact bytes: digests cover them
        auth = self._known_auth(reg.name, scope, creds)
        if auth:
            sent["Authorization"] = auth
        resp = await self._follow(method, url, sent)
        if resp.status != 401:
            return resp
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            resp.release()
            self._challenges[reg.name] = bearer
            token = await self._tokens.token(bearer, bearer.scope or scope, creds)
            sent["Authorization"] = f"Bearer {token}"
        elif basic is not None and creds is not None and "Authorization" not in sent:
            resp.release()
            self._challenges[reg.name] = basic
            sent["Authorization"] = creds.basic()
        else:
            return resp
        return await self._follow(method, url, sent)

    def _known_auth(self, registry: str, scope: str, creds: Credentials | None) -> str | None:
        """Skip the 401 round trip when a usable token for this scope is already cached."""
        challenge = self._challenges.get(registry)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return creds.basic() if creds else None
        token = self._tokens.cached(challenge, scope, creds)
        return f"Bearer {token}" if token else None

    async def _follow(
        self, method: str, url: URL, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """Send, following redirects by hand: the registry's Authorization header never goes
        to another host (presigned CDN and S3 URLs reject it, and it must not leak)."""
        for _ in range(_MAX_REDIRECTS + 1):
            async with asyncio.timeout(self._config.header_timeout):
                resp = await self._session.request(
                    method, url, headers=headers, allow_redirects=False, timeout=self._timeout
                )
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            target = url.join(URL(location, encoded=True))
            if target.origin() != url.origin():
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise UpstreamError(502, "too many redirects")
