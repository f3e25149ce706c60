"""The hottest request without aiohttp's per-request machinery: a cached manifest from memory.

A second pull of a cached image through containerd sends just one request, the tag HEAD; a
node fleet scaling out sends thousands per second. aiohttp spends most of its time per request
building objects this answer does not need (about 7k requests/s on one core here, where the
same answer from a bare protocol goes past 80k). So every connection starts on this protocol:
it parses with httptools (the parser aiohttp's own C speedups wrap) and answers GET and HEAD of
a manifest it can serve from memory: a digest in the manifest cache, or a tag whose record is
fresh. The answer comes from the same routing and reference rules (mirror.http.parse), the same
freshness and Accept rules, the same headers (mirror.http.headers) and the same parser limits
(mirror.http.server) as the full handler's: byte for byte the answer aiohttp would give, apart
from Date and X-Request-ID.

Anything else, and anything unusual (a body, a partial request, an upgrade or CONNECT, a parse
error, a request aiohttp's parser would refuse, a route that errs), hands the connection with
the unanswered bytes to aiohttp's protocol, for good. The handover happens only at a point
where every earlier request has been answered completely, so aiohttp sees a clean stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate

import httptools
from aiohttp import web
from aiohttp.http_parser import SINGLETON_HEADERS

from mirror.cache.manifests import Manifest, ManifestService
from mirror.config import Config
from mirror.http.connections import ClientConnections, reset
from mirror.http.headers import API_VERSION, REQUEST_ID, SERVER, manifest_headers
from mirror.http.parse import manifest_reference, query_ns, target_of
from mirror.http.server import KEEPALIVE_TIMEOUT, MAX_FIELD, MAX_HEADERS, MAX_LINE
from mirror.log import access_line
from mirror.metrics import RequestMetrics
from mirror.oci.digest import Digest
from mirror.oci.errors import RegistryError
from mirror.oci.mediatypes import accepted_types
from mirror.oci.paths import Kind, parse_v2_path

MAX_ANSWER_BYTES = 1024 * 1024  # answered per read before a pipelining client goes to aiohttp

_MEMO_SIZE = 8192
_ACCEPT_MEMO_SIZE = 256  # clients send a handful of distinct Accept sets
_HEAD_MEMO_SIZE = 1024  # distinct manifests answered recently
# aiohttp's limit on one header is MAX_FIELD, but what it counts shifts with the header before
# (a name's share of the previous one's); a name or value past half of it, and every
# borderline case is aiohttp's.
_LONG_HEADER = MAX_FIELD // 2

# aiohttp refuses a request with two of these (llhttp's strict mode alone would not).
_SINGLETONS = frozenset(name.encode() for name in SINGLETON_HEADERS)
# Headers after which aiohttp's answer is not just the manifest: a body to read or frame, a
# 100 Continue first, an old websocket handshake it refuses. aiohttp answers those itself.
_HANDED_OVER = frozenset(
    {b"content-length", b"transfer-encoding", b"expect", b"sec-websocket-key1"}
)


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
    answerable: bool  # nothing in it that aiohttp would answer other than with the manifest


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

    def __init__(
        self,
        config: Config,
        manifests: ManifestService,
        requests: RequestMetrics,
        request_ids: Callable[[str | None], str],
    ) -> None:
        self._config = config
        self._manifests = manifests
        self._hits = requests.counter("manifest", "hit")
        self._durations = requests.durations("manifest")
        self._request_ids = request_ids
        self._access_log = config.server.access_log
        self._date = _Date()
        self._routes: dict[bytes, _Route | None] = {}
        self._accepts: dict[tuple[bytes, ...], frozenset[str]] = {}
        self._heads: dict[tuple[str, str, int], bytes] = {}
        self._names: dict[tuple[bytes, ...], tuple[bool, bool]] = {}
        self.connections: set[FastProtocol] = set()

    def close(self) -> None:
        """Close every connection still on this protocol (idle keep-alives, at shutdown)."""
        for connection in list(self.connections):
            connection.close()

    def answer(self, req: _Request, peer: str | None) -> bytes | None:
        started = time.perf_counter()
        if req.method not in (b"GET", b"HEAD") or not req.answerable:
            return None
        found = self._lookup(req)
        if found is None:
            return None
        manifest, route_ = found
        rid = self._request_ids(_header(req.headers, b"x-request-id"))
        body_len = len(manifest.body)
        # In the order aiohttp writes them: the handler's headers and Content-Length, Date,
        # Server, Connection when the version does not imply it, then on_response_prepare's.
        if req.keep_alive:
            connection = _KEEP_ALIVE if req.http_10 else b""
        else:
            connection = b"" if req.http_10 else _CLOSE
        out = b"%s%sDate: %s\r\n%s%s%s%s: %s\r\n\r\n%s" % (
            _OK_10 if req.http_10 else _OK_11, self._head(manifest, body_len),
            self._date.value(), _SERVER, connection, _API_VERSION, _RID, rid.encode(),
            b"" if req.method == b"HEAD" else manifest.body,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        self._hits.value += 1
        self._durations.observe(seconds)
        if self._access_log:
            access_line(
                method=req.method.decode(), path=route_.path, ns=route_.ns, route="manifest",
                registry=route_.registry, status=200,
                sent=0 if req.method == b"HEAD" else body_len, seconds=seconds, cache="hit",
                client=peer, user_agent=_header(req.headers, b"user-agent"), request_id=rid,
                fast_path=True,
            )  # fmt: skip
        return out

    def header_names(self, names: tuple[bytes, ...]) -> tuple[bool, bool]:
        """(whether aiohttp would take these header names and answer with just the manifest,
        whether Host is among them). Memoized: a client sends the same names every time."""
        found = self._names.get(names)
        if found is None:
            found = judge_header_names(names)
            if len(self._names) >= _ACCEPT_MEMO_SIZE:
                self._names.clear()
            self._names[names] = found
        return found

    def _head(self, manifest: Manifest, body_len: int) -> bytes:
        """The manifest's own headers: the same for every answer of it."""
        key = (manifest.digest, manifest.media_type, body_len)
        head = self._heads.get(key)
        if head is None:
            fields = {**manifest_headers(manifest.media_type, manifest.digest)}
            fields["Content-Length"] = str(body_len)
            head = b"".join(
                b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in fields.items()
            )
            if len(self._heads) >= _HEAD_MEMO_SIZE:
                self._heads.clear()
            self._heads[key] = head
        return head

    def _lookup(self, req: _Request) -> tuple[Manifest, _Route] | None:
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
        return manifest, route_

    def _route(self, url: bytes) -> _Route | None:
        """Pure in the URL and the config, hence memoized: parse, route and validate once."""
        if b"#" in url:
            return None  # a fragment: aiohttp's to drop
        raw_path, _, raw_query = url.partition(b"?")
        try:
            path = raw_path.decode("ascii")
            query = raw_query.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not path.startswith("/v2/") or "%" in path:
            return None  # percent-escapes in a path are aiohttp's to decode
        parsed = parse_v2_path(path[4:])
        if parsed.kind is not Kind.MANIFEST:
            return None
        ns = query_ns(query)
        config = self._config
        try:
            target = target_of(parsed.name, ns, config.registries, config.default_registry)
            digest = manifest_reference(parsed.reference)
        except RegistryError:
            return None  # the handler answers with the error
        return _Route(target.registry, target.name, parsed.reference, digest, path, ns)


_OK_10, _OK_11 = b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 200 OK\r\n"  # aiohttp answers in kind
# Sent when the version does not imply it: aiohttp's rule.
_KEEP_ALIVE, _CLOSE = b"Connection: keep-alive\r\n", b"Connection: close\r\n"
_SERVER = b"%s: %s\r\n" % (SERVER[0].encode(), SERVER[1].encode())
_API_VERSION = b"%s: %s\r\n" % (API_VERSION[0].encode(), API_VERSION[1].encode())
_RID = REQUEST_ID.encode()

# Where create_app keeps the FastPath (defined here: mirror.keys sits below mirror.http).
fast_path_key = web.AppKey("fast_path", FastPath)


def judge_header_names(names: tuple[bytes, ...]) -> tuple[bool, bool]:
    """The checks aiohttp's parser makes on header names beyond llhttp's own (a request it
    refuses must never get a 200 here), and the headers it answers differently."""
    if len(names) > MAX_HEADERS:
        return False, False
    seen: set[bytes] = set()
    for name in names:
        lower = name.lower()
        if len(name) > _LONG_HEADER or lower in _HANDED_OVER:
            return False, False
        if lower in _SINGLETONS:
            if lower in seen:
                return False, False
            seen.add(lower)
    return True, b"host" in seen


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
        self._refused = False  # by aiohttp's parser rules, or not just a manifest to answer
        self._body = False
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
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # An upgrade (h2c, websocket) or CONNECT stops this parser where the request ends:
            # aiohttp answers it as HTTP/1.1, or refuses it, and reads on.
            self._hand_over(data)
            return
        requests, self._complete = self._complete, []
        if self._partial or self._body or not requests:
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
        self._refused = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            self._refused = True  # aiohttp answers these with its 400

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp has refused control characters already; names are judged once per request.
        self._headers.append((name, value))
        if len(value) > _LONG_HEADER:
            self._refused = True

    def on_body(self, body: bytes) -> None:
        self._body = True

    def on_message_complete(self) -> None:
        self._partial = False
        version = self._parser.get_http_version()
        names_allowed, host = self._fast.header_names(tuple([name for name, _ in self._headers]))
        answerable = (
            names_allowed
            and not self._refused
            and self._url.startswith(b"/")  # origin-form: "*" and absolute URLs are aiohttp's
            and (version == "1.0" or (version == "1.1" and host))
        )
        self._complete.append(
            _Request(
                self._parser.get_method(), self._url, tuple(self._headers),
                self._parser.should_keep_alive(), version == "1.0", answerable,
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
