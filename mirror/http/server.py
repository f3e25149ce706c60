"""aiohttp's connection protocol as the mirror runs it: parser limits the manifest fast path
shares, and an OCI JSON 400 with one rate-limited warning for a request no parser can read."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mirror.http.headers import API_VERSION, REQUEST_ID, SERVER
from mirror.metrics import RequestMetrics
from mirror.oci.errors import ErrorCode, error_body

log = structlog.get_logger("mirror.http")

# aiohttp's own defaults, set here explicitly because the fast path applies the same limits
# to the requests it answers itself: both paths refuse exactly the same requests.
MAX_LINE = 8190  # request target
MAX_FIELD = 8190  # one header, name and value together
MAX_HEADERS = 128
# How long an idle keep-alive connection stays open, on either path (aiohttp's own default is
# an hour, far more than a node's connection pool holds one).
KEEPALIVE_TIMEOUT = 75.0

# Where aiohttp's description of a parse error ends and a copy of the request's own bytes
# begins (a quoted header value may be a credential: it never reaches a log line).
_QUOTED = re.compile(r"""\s*[bB]?['"]""")


class BadRequests:
    """Requests that are not HTTP/1.x at all: counted, and logged as at most one warning line
    per `interval` with the number left out since the last one. A garbage request costs a
    client 33 bytes; it must not cost the mirror a traceback's kilobyte of log each."""

    def __init__(
        self,
        metrics: RequestMetrics,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 1.0,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._interval = interval
        self._quiet_until = float("-inf")
        self._suppressed = 0

    def note(self, reason: str, client: str | None) -> None:
        self._metrics.count("other", "error")
        now = self._clock()
        if now < self._quiet_until:
            self._suppressed += 1
            return
        log.warning("bad_request", reason=reason, client=client, suppressed=self._suppressed)
        self._suppressed = 0
        self._quiet_until = now + self._interval


def reason_of(exc: BaseException | None) -> str:
    """aiohttp's description of why a request could not be parsed, without the request bytes
    it quotes: "Got more than 8190 bytes when reading", "Bad status line: Invalid method"."""
    text = exc.message if isinstance(exc, HttpProcessingError) else ""
    text = _QUOTED.split(str(text).split("\n\n", 1)[0], maxsplit=1)[0]
    return " ".join(text.split()).rstrip(":. ")[:120] or type(exc).__name__


class RequestHandler(web.RequestHandler):
    """aiohttp's protocol for one connection; only its answer to unparsable requests differs."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        bad_requests: BadRequests,
        request_ids: Callable[[str | None], str],
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._bad_requests = bad_requests
        self._request_ids = request_ids

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # a bug: traceback
        reason = reason_of(exc)
        self._bad_requests.note(reason, request.remote)
        body = error_body(ErrorCode.BAD_REQUEST, "not a valid HTTP/1.1 request", {"reason": reason})
        headers = {
            "Content-Type": "application/json",
            SERVER[0]: SERVER[1],
            API_VERSION[0]: API_VERSION[1],
            REQUEST_ID: self._request_ids(None),
        }
        response = web.Response(status=400, body=body, headers=headers)
        response.force_close()  # the parser has lost its place in the stream: nothing follows
        return response


# Where create_app keeps the BadRequests (defined here: mirror.keys sits below mirror.http).
bad_requests_key = web.AppKey("bad_requests", BadRequests)


def handler_factory(
    server: web.Server, bad_requests: BadRequests, request_ids: Callable[[str | None], str]
) -> Callable[[], RequestHandler]:
    """A new protocol per connection, for aiohttp's `server` (what AppRunner set up)."""
    loop = asyncio.get_running_loop()

    def make() -> RequestHandler:
        return RequestHandler(
            server, loop=loop, bad_requests=bad_requests, request_ids=request_ids,
            access_log=None,  # the middleware writes the one access line per request
            keepalive_timeout=KEEPALIVE_TIMEOUT, max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD, max_headers=MAX_HEADERS,
        )  # fmt: skip

    return make
