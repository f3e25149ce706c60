"""The hottest request without aiohttp's per-request machinery: a cached manifest from memory.

A second pull of a cached image through containerd sends just one request, the tag HEAD; a
node fleet scaling out sends thousands per second. aiohttp spends most of its time per request
building objects this answer does not need (about 7k requests/s on one core here, where the
same answer from a bare protocol goes past 80k). So every connection starts on this protocol:
it parses with httptools (the parser aiohttp's own C speedups wrap) and answers GET and HEAD of
a manifest it can serve from memory: a digest in the manifest cache, or a tag whose record is
fresh. The answer comes from the same routing, freshness and Accept rules as the full handler.

Anything else, and anything unusual (a body, a partial request, a parse error, a route that
errs), hands the connection with the unanswered bytes to aiohttp's protocol, for good. The
handover happens only at a point where every earlier request has been answered completely,
so aiohttp sees a clean stream.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import parse_qs

import httptools

from mirror.cache.manifests import Manifest, ManifestService
from mirror.config import Config
from mirror.http.connections import ClientConnections, reset
from mirror.log import access_line
from mirror.metrics import Metrics
from mirror.oci.digest import Digest, InvalidDigest, parse_digest
from mirror.oci.mediatypes import accepted_types
from mirror.oci.paths import Kind, parse_v2_path, route
from mirror.oci.reference import InvalidName, is_tag

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
KEEPALIVE_TIMEOUT = 75.0  # idle keep-alive connections close after this (aiohttp's too: serve)
MAX_ANSWER_BYTES = 1024 * 1024  # answered per read before a pipelining client goes to aiohttp
MAX_FIELD = 8190  # aiohttp's own limit for a request line or header: beyond it, its 400


_MEMO_SIZE = 8192
_ACCEPT_MEMO_SIZE = 256  # clients send a handful of distinct Accept sets


@dataclass(frozen=True, slots=True)
class _Route:
    registry: str
    name: str
    reference: str
    digest: Digest | None
    path: str
    ns: str | None


@dataclass(frozen=True, slots=True)
class _Request:
    method: bytes
    url: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    keep_alive: bool
    http_10: bool


class _Date:
    """The Date header, formatted once a second rather than once a request."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


class FastPath:
    """What the protocol needs from the app: the answer for one parsed request, or None."""

    def __init__(self, config: Config, manifests: ManifestService, metrics: Metrics) -> None:
        self._config = config
        self._manifests = manifests
        self._tally = metrics.tally("manifest", "hit")
        self._access_log = config.server.access_log
        self._date = _Date()
        self._routes: dict[bytes, _Route | None] = {}
        self._accepts: dict[tuple[bytes, ...], frozenset[str]] = {}
        self._rid_prefix = secrets.token_hex(4)
        self._rid_count = itertools.count(1)
        self.connections: set[FastProtocol] = set()

    def flush_metrics(self) -> None:
        self._tally.flush()

    def answer(self, req: _Request, peer: str | None) -> bytes | None:
        started = time.perf_counter()
        if req.method not in (b"GET", b"HEAD"):
            return None
        found = self._lookup(req)
        if found is None:
            return None
        manifest, registry, path, ns = found
        rid = self._request_id(req.headers)
        body_len = len(manifest.body)
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nDocker-Content-Digest: %s\r\n"
            b'ETag: "%s"\r\nContent-Length: %d\r\nDate: %s\r\n'
            b"Docker-Distribution-API-Version: registry/2.0\r\nX-Request-ID: %s\r\n"
            % (
                manifest.media_type.encode(), manifest.digest.encode(),
                manifest.digest.encode(), body_len, self._date.value(), rid.encode(),
            )
        )  # fmt: skip
        if not req.keep_alive:
            head += b"Connection: close\r\n"
        elif req.http_10:
            head += b"Connection: keep-alive\r\n"
        out = head + b"\r\n" + (b"" if req.method == b"HEAD" else manifest.body)
        seconds = time.perf_counter() - started
        self._tally.record(seconds)
        if self._access_log:
            access_line(
                method=req.method.decode(), path=path, ns=ns, route="manifest",
                registry=registry, status=200, sent=0 if req.method == b"HEAD" else body_len,
                seconds=seconds, cache="hit", client=peer,
                user_agent=_header(req.headers, b"user-agent"), request_id=rid, fast_path=True,
            )  # fmt: skip
        return out

    def _lookup(self, req: _Request) -> tuple[Manifest, str, str, str | None] | None:
        if req.url in self._routes:
            route_ = self._routes[req.url]
        else:
            route_ = self._route(req.url)
            if len(self._routes) >= _MEMO_SIZE:
                self._routes.clear()  # crude, but bounded; a real working set is small
            self._routes[req.url] = route_
        if route_ is None:
            return None
        accept_values = tuple(v for k, v in req.headers if k.lower() == b"accept")
        accepted = self._accepts.get(accept_values)
        if accepted is None:
            accepted = accepted_types(v.decode("latin-1") for v in accept_values)
            if len(self._accepts) >= _ACCEPT_MEMO_SIZE:
                self._accepts.clear()
            self._accepts[accept_values] = accepted
        if route_.digest is not None:
            manifest = self._manifests.peek_digest(route_.digest, accepted)
        else:
            manifest = self._manifests.peek_tag(
                route_.registry, route_.name, route_.reference, accepted
            )
        if manifest is None:
            return None
        return manifest, route_.registry, route_.path, route_.ns

    def _route(self, url: bytes) -> _Route | None:
        """Pure in the URL and the config, hence memoized: parse, route and validate once."""
        raw_path, _, raw_query = url.partition(b"?")
        try:
            path = raw_path.decode("ascii")
            query = parse_qs(raw_query.decode("ascii")) if raw_query else {}
        except UnicodeDecodeError:
            return None
        if not path.startswith("/v2/") or "%" in path:
            return None
        parsed = parse_v2_path(path[4:])
        if parsed.kind is not Kind.MANIFEST:
            return None
        ns_values = query.get("ns")
        ns = ns_values[0] if ns_values else None  # decoded once, like aiohttp's query
        config = self._config
        try:
            target = route(parsed.name, ns, config.registries, config.default_registry)
        except (LookupError, InvalidName):
            return None
        reference = parsed.reference
        digest = None
        if ":" in reference:
            try:
                digest = parse_digest(reference)
            except InvalidDigest:
                return None
        elif not is_tag(reference):
            return None
        return _Route(target.registry, target.name, reference, digest, path, ns)

    def _request_id(self, headers: tuple[tuple[bytes, bytes], ...]) -> str:
        supplied = _header(headers, b"x-request-id")
        if supplied and _REQUEST_ID.fullmatch(supplied.encode()):
            return supplied
        # unique per process start and request, without a system call per request
        return f"{self._rid_prefix}{next(self._rid_count):08x}"


def _header(headers: tuple[tuple[bytes, bytes], ...], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class FastProtocol(asyncio.Protocol):
    """Starts every connection; answers what FastPath can, hands the rest to aiohttp."""

    def __init__(
        self,
        fast: FastPath,
        fallback: Callable[[], asyncio.Protocol],
        loop: asyncio.AbstractEventLoop,
        connections: ClientConnections,
    ) -> None:
        self._fast = fast
        self._fallback = fallback
        self._loop = loop
        self._connections = connections
        self._waiting_head = True  # for the first request's head, since the connection came
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._complete: list[_Request] = []
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = False
        self._oversize = False  # a line past aiohttp's limit: never answered, never memoized
        self._partial = False
        self._idle: asyncio.TimerHandle | None = None
        self._last_active = 0.0
        self._peer: str | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        if not self._connections.admit(stream):
            return  # answered 503 and closed: over the connection limit
        self._transport = stream
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        self._fast.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._connections.release(self._transport)
        self._fast.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()  # a client that does not read gets no more answers

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._hand_over(data)
            return
        requests, self._complete = self._complete, []
        if self._partial or self._body or self._oversize or not requests:
            self._hand_over(data)  # not a chunk of whole, bodiless requests: aiohttp's job
            return
        if any(not r.keep_alive for r in requests[:-1]):
            self._hand_over(data)  # requests after a Connection: close: aiohttp's rules apply
            return
        answers = []
        size = 0
        for req in requests:
            answer = self._fast.answer(req, self._peer)
            if answer is None or size + len(answer) > MAX_ANSWER_BYTES:
                # Nothing of this chunk was answered yet: hand it all. Past the cap, aiohttp's
                # one-at-a-time answers with flow control keep a pipelining client bounded.
                self._hand_over(data)
                return
            size += len(answer)
            answers.append(answer)
        assert self._transport is not None
        if self._waiting_head:
            self._waiting_head = False
            self._connections.head_done(self._transport)
        self._transport.write(b"".join(answers) if len(answers) > 1 else answers[0])
        if not requests[-1].keep_alive:
            self._transport.close()
        else:
            self._arm_idle()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._partial = True
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_FIELD:
            self._oversize = True  # aiohttp answers these with its own 400

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(value) > MAX_FIELD:
            self._oversize = True

    def on_body(self, body: bytes) -> None:
        self._body = True

    def on_message_complete(self) -> None:
        self._partial = False
        self._complete.append(
            _Request(
                self._parser.get_method(), self._url, tuple(self._headers),
                self._parser.should_keep_alive(), self._parser.get_http_version() == "1.0",
            )
        )  # fmt: skip

    # -- internals ---------------------------------------------------------------------------

    def _hand_over(self, data: bytes) -> None:
        """From here on aiohttp owns the connection, starting with these unanswered bytes."""
        if self._idle is not None:
            self._idle.cancel()
        self._fast.connections.discard(self)
        transport = self._transport
        assert transport is not None
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def _arm_idle(self) -> None:
        """Note activity; one timer per connection checks it (no timer churn per request)."""
        self._last_active = self._loop.time()
        if self._idle is None:
            self._idle = self._loop.call_later(KEEPALIVE_TIMEOUT, self._check_idle)

    def _check_idle(self) -> None:
        left = self._last_active + KEEPALIVE_TIMEOUT - self._loop.time()
        if left <= 0:
            if self._transport is not None and self._transport.get_write_buffer_size():
                reset(self._transport)  # answers it never read: a close would wait for ever
            else:
                self.close()
        else:
            self._idle = self._loop.call_later(left, self._check_idle)
