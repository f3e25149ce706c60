"""The OCI distribution pull API: /v2/, manifests, blobs and tags, read-only."""

from __future__ import annotations

import structlog
from aiohttp import web

from mirror.cache.body import BlobBody, BodyFailed, Redirect
from mirror.http.headers import manifest_headers
from mirror.http.parse import manifest_reference, query_ns, target_of
from mirror.http.sendfile import Sent, drop, write_body
from mirror.keys import (
    blobs_key,
    config_key,
    kind_key,
    manifests_key,
    metrics_key,
    registry_key,
    result_key,
    sendfile_pool_key,
    sent_key,
)
from mirror.oci.digest import InvalidDigest, parse_digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.mediatypes import accepted_types
from mirror.oci.paths import Kind, Target, next_page_link, parse_v2_path
from mirror.oci.peering import from_peer
from mirror.oci.ranges import UnsatisfiableRange, parse_range

log = structlog.get_logger("mirror.handlers")

_READ_ONLY = RegistryError(
    ErrorCode.UNSUPPORTED, "the mirror is read-only: push and delete are not supported"
)


async def base(request: web.Request) -> web.Response:
    """The ping skopeo and podman send first; 200 means "a registry, no auth needed"."""
    request[kind_key] = "base"
    return web.json_response({})


async def dispatch(request: web.Request) -> web.StreamResponse:
    path = parse_v2_path(request.match_info["tail"])
    request[kind_key] = path.kind.value
    if request.method not in ("GET", "HEAD") or path.kind in (Kind.UPLOAD, Kind.CATALOG):
        raise _READ_ONLY
    if path.kind is Kind.BASE:
        return await base(request)
    if path.kind in (Kind.UNKNOWN, Kind.REFERRERS):
        raise RegistryError(ErrorCode.NOT_FOUND, detail={"path": request.path})
    config = request.app[config_key]
    target = target_of(path.name, _ns(request), config.registries, config.default_registry)
    request[registry_key] = target.registry
    if from_peer(request.headers):
        request.app[metrics_key].peer_requests.labels("served", "ok").inc()
    if path.kind is Kind.MANIFEST:
        return await _manifest(request, target, path.reference)
    if path.kind is Kind.BLOB:
        return await _blob(request, target, path.reference)
    return await _tags(request, target)


def _ns(request: web.Request) -> str | None:
    return query_ns(request.rel_url.raw_query_string)


async def _manifest(request: web.Request, target: Target, reference: str) -> web.Response:
    manifests = request.app[manifests_key]
    accepted = accepted_types(request.headers.getall("Accept", []))
    digest = manifest_reference(reference)
    if digest is not None:
        answer = await manifests.by_digest(
            target.registry, target.name, digest, accepted, for_peer=from_peer(request.headers)
        )
    else:
        answer = await manifests.by_tag(target.registry, target.name, reference, accepted)
    request[result_key] = answer.result
    m = answer.manifest
    # HEAD gets the same headers, Content-Length included, and aiohttp leaves the body out.
    return web.Response(body=m.body, headers=manifest_headers(m.media_type, m.digest))


async def _blob(request: web.Request, target: Target, reference: str) -> web.StreamResponse:
    try:
        digest = parse_digest(reference)
    except InvalidDigest as exc:
        raise RegistryError(ErrorCode.DIGEST_INVALID, str(exc), {"digest": reference}) from exc
    blobs = request.app[blobs_key]
    headers = {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
    }
    if request.method == "HEAD":
        size, result = await blobs.size(target.registry, target.name, digest)
        request[result_key] = result
        return web.Response(headers={**headers, "Content-Length": str(size)})
    body = await blobs.open(
        target.registry, target.name, digest, for_peer=from_peer(request.headers)
    )
    request[result_key] = body.result
    if isinstance(body, Redirect):
        return _redirect(request, body, headers)
    try:
        return await _send(request, body, headers)
    finally:
        body.close()


def _redirect(request: web.Request, redirect: Redirect, headers: dict[str, str]) -> web.Response:
    """307 to the bucket's presigned URL: the node reads the bytes from S3 directly, with
    the same method and Range (S3 honours a single range), and no Authorization."""
    start, end, _ = _span(request, redirect.size)
    request.app[metrics_key].served_bytes.labels("redirect").inc(end - start + 1)
    return web.Response(
        status=307,
        headers={
            "Location": redirect.url,
            "Docker-Content-Digest": headers["Docker-Content-Digest"],
            "Cache-Control": "no-store",  # the URL expires; never reuse it from a cache
        },
    )


def _span(request: web.Request, size: int) -> tuple[int, int, bool]:
    """(start, end inclusive, partial) for the request's Range against a blob of `size`."""
    try:
        span = parse_range(request.headers.get("Range"), size)
    except UnsatisfiableRange as exc:
        raise RegistryError(
            ErrorCode.RANGE_INVALID, headers={"Content-Range": f"bytes */{size}"}
        ) from exc
    return (span[0], span[1], True) if span else (0, size - 1, False)


async def _send(
    request: web.Request, body: BlobBody, headers: dict[str, str]
) -> web.StreamResponse:
    start, end, partial = _span(request, body.size)
    await body.ready(start, end + 1)
    response = web.StreamResponse(status=206 if partial else 200, headers=headers)
    if partial:
        response.headers["Content-Range"] = f"bytes {start}-{end}/{body.size}"
    response.content_length = end - start + 1
    sent = Sent()
    try:
        await write_body(
            request, response, body.segments(start, end + 1), request.app[sendfile_pool_key], sent
        )
    except BodyFailed as exc:
        # Headers are out: the only honest signal left is how the connection ends. Raising
        # would let the middleware write an error response into this body, whose first bytes
        # could complete Content-Length: a whole, wrong blob with a 200.
        log.warning(
            "blob_stream_aborted", digest=headers["Docker-Content-Digest"], error=str(exc),
            wrong_bytes=exc.wrong_bytes, sent=sent.bytes,
        )  # fmt: skip
        request[result_key] = "error"
        if exc.wrong_bytes:
            # A reset, never a FIN: the bytes it has are wrong, and a client that saw a clean
            # end would resume them with Range (containerd glues the good tail on, then fails
            # its commit). A reset it treats as fatal, and pulls again from scratch.
            drop(request)
        else:
            # Good so far, cut short: a body short of Content-Length ended with a FIN, which
            # containerd resumes with Range (a reset would be fatal for it).
            response.force_close()
    except ConnectionError:
        drop(request)  # hung up, or stopped reading: the follower and its file go at once
    finally:
        request.app[metrics_key].served_bytes.labels(body.source).inc(sent.bytes)
        request[sent_key] = sent.bytes
    return response  # unfinished if cut short: write_eof would add nothing to a sized body


async def _tags(request: web.Request, target: Target) -> web.Response:
    query = {k: v for k, v in request.query.items() if k in ("n", "last")}
    listed = await request.app[manifests_key].tags(target.registry, target.name, query)
    request[result_key] = "miss"
    response = web.Response(body=listed.body, content_type="application/json")
    # The registry's next page is named by its own path: the client must come back here,
    # with its registry prefix or ns, or paging (skopeo list-tags) would leave the mirror.
    link = next_page_link(listed.link, request.rel_url.raw_path, _ns(request))
    if link is not None:
        response.headers["Link"] = link
    return response
