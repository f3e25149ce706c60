"""Per request: a request id, the one OCI error renderer, the access line and request metrics."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.typedefs import Handler

from mirror.http.headers import API_VERSION, REQUEST_ID, SERVER
from mirror.http.parse import query_ns
from mirror.keys import (
    config_key,
    kind_key,
    metrics_key,
    registry_key,
    request_id_key,
    request_ids_key,
    result_key,
    sent_key,
)
from mirror.log import access_line
from mirror.oci.errors import ErrorCode, RegistryError, error_body

log = structlog.get_logger("mirror.access")

_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})
_KINDS = frozenset({"manifest", "blob", "tags"})
_VERSIONS = frozenset({HttpVersion10, HttpVersion11})


def render_error(error: RegistryError, method: str) -> web.Response:
    headers = {"Content-Type": "application/json", **error.headers}
    if method == "HEAD":  # same status and headers, never a body
        return web.Response(status=error.status, headers=headers)
    body = error_body(error.code, error.message, error.detail)
    return web.Response(status=error.status, body=body, headers=headers)


def _from_http(exc: web.HTTPException) -> RegistryError:
    if exc.status == 405:
        return RegistryError(ErrorCode.UNSUPPORTED, "the mirror is read-only")
    if exc.status == 404:
        return RegistryError(ErrorCode.NOT_FOUND)
    return RegistryError(ErrorCode.UNKNOWN, exc.reason, status=exc.status)


def _refusal(request: web.Request) -> RegistryError | None:
    """What neither request path answers, whichever parser let it through: not a proxy, so no
    CONNECT tunnel; HTTP/1.0 and 1.1 only (an HTTP/0.9 request line has no headers at all).
    An Upgrade (h2c, websocket) is not refused: the request is answered as HTTP/1.1."""
    if request.method == "CONNECT":
        return RegistryError(ErrorCode.UNSUPPORTED, "the mirror is not a proxy: no CONNECT")
    if request.version not in _VERSIONS:
        return RegistryError(ErrorCode.BAD_REQUEST, "HTTP/1.0 or HTTP/1.1 only")
    return None


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.app[request_ids_key](request.headers.get(REQUEST_ID))
    request[request_id_key] = rid
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    aborted = False
    refused = _refusal(request)
    with structlog.contextvars.bound_contextvars(request_id=rid):
        try:
            try:
                if refused is not None:
                    raise refused
                response = await handler(request)
            except RegistryError as exc:
                if _answered(request):
                    request[result_key] = "error"
                    raise
                response = render_error(exc, request.method)
                if refused is not None:
                    response.force_close()  # what follows is a tunnel, or no HTTP/1.x at all
                request[result_key] = _result_of(exc.status)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = render_error(_from_http(exc), request.method)
            except asyncio.CancelledError:
                status = 499  # the client went away; what it shared carries on without it
                aborted = True
                raise
            except Exception as exc:
                if isinstance(exc, ConnectionError) and _gone(request):
                    # The client hung up under a handler: normal, not a server error. Raised
                    # on, aiohttp would log a traceback; this stand-in never reaches the wire.
                    aborted = True
                    response = web.Response(status=499)
                else:
                    log.exception("unhandled_error", method=request.method, path=request.path)
                    request[result_key] = "error"
                    if _answered(request):
                        raise
                    response = render_error(RegistryError(ErrorCode.UNKNOWN), request.method)
            status = response.status
            aborted = aborted or _cut_short(request, response)
            return response
        finally:
            _account(request, response, status, aborted, time.perf_counter() - started)


def _result_of(status: int) -> str:
    """A refusal the client should take as an answer (not here) is not a failure of ours:
    the error rate must not rise because nodes ask for tags that do not exist."""
    return "not_found" if status == 404 else "error"


def _answered(request: web.Request) -> bool:
    """True once a response's status line is on the wire. A second response would then be
    written into the first one's body, where its bytes could complete the Content-Length: a
    whole, wrong blob with a 200. Re-raised instead, the error makes aiohttp close the
    connection, so the client sees a short body ended by a FIN."""
    return request.writer.output_size > 0


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _cut_short(request: web.Request, response: web.StreamResponse) -> bool:
    """The client left (hung up, or was dropped for not reading) before the whole body of a
    response its handler streamed itself reached it."""
    if not response.prepared or response.content_length is None or not _gone(request):
        return False
    sent: int = request.get(sent_key, 0)
    return sent < response.content_length


def _account(
    request: web.Request,
    response: web.StreamResponse | None,
    status: int,
    aborted: bool,
    seconds: float,
) -> None:
    if request.path in _QUIET:
        return
    kind = request.get(kind_key, "other")
    result = request.get(result_key, _result_of(status) if status >= 400 else "none")
    metrics = request.app[metrics_key]
    metric_kind = kind if kind in _KINDS else "other"
    metrics.requests.observe(metric_kind, seconds)
    if result != "none":
        metrics.requests.count(metric_kind, result)
    if not request.app[config_key].server.access_log:
        return
    sent = request.get(sent_key, 0)
    if response is not None and not sent:
        if response.prepared:
            sent = response.body_length
        elif isinstance(response, web.Response) and request.method != "HEAD":
            sent = response.content_length or 0
    # A hang-up is one field of the access line, not an error: nodes do it all the time.
    extra = {"aborted": True} if aborted else {}
    access_line(
        method=request.method, path=request.path, ns=query_ns(request.rel_url.raw_query_string),
        route=kind,
        registry=request.get(registry_key), status=status, sent=sent, seconds=seconds,
        cache=result, client=request.remote, user_agent=request.headers.get("User-Agent"),
        **extra,
    )  # fmt: skip


async def add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: also reaches streamed responses that middleware cannot touch later."""
    response.headers[SERVER[0]] = SERVER[1]
    response.headers[API_VERSION[0]] = API_VERSION[1]
    rid = request.get(request_id_key)
    if rid:
        response.headers[REQUEST_ID] = rid
