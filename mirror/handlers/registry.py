"""The OCI distribution pull API: /v2/, manifests, blobs and tags, read-only."""

from __future__ import annotations

import contextlib

import structlog
from aiohttp import web

from mirror.cache.blobs import CachedBlob, LiveBlob
from mirror.cache.errors import to_registry_error
from mirror.cache.transfer import DownloadFailed
from mirror.http.headers import manifest_headers
from mirror.http.parse import manifest_reference, query_ns, target_of
from mirror.http.sendfile import (
    Sent,
    StallGuard,
    drop,
    idle_timeout,
    send_file,
    send_rest,
)
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
from mirror.oci.digest import Digest, InvalidDigest, parse_digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.mediatypes import accepted_types
from mirror.oci.paths import Kind, Target, next_page_link, parse_v2_path
from mirror.oci.ranges import UnsatisfiableRange, parse_range

log = structlog.get_logger("mirror.handlers")

_READ_ONLY = RegistryError(
    ErrorCode.UNSUPPORTED, "the mirror is read-only: push and delete are not supported"
)


# A reader that joined a download switches to sendfile for what is left once the blob is
# verified on disk, when enough is left for it to pay (pread + write costs ~6x more CPU/GB).
_SENDFILE_SWITCH = 1024 * 1024


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
        answer = await manifests.by_digest(target.registry, target.name, digest, accepted)
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
    opened = await blobs.open(target.registry, target.name, digest)
    request[result_key] = opened.result
    if isinstance(opened.source, CachedBlob):
        try:
            return await _send_cached(request, opened.source, digest, headers)
        except FileNotFoundError:  # evicted between lookup and open: nothing was sent yet
            opened = await blobs.open(target.registry, target.name, digest)
            request[result_key] = opened.result
            if isinstance(opened.source, CachedBlob):
                return await _send_cached(request, opened.source, digest, headers)
    return await _stream_live(request, opened.source, headers)


def _span(request: web.Request, size: int) -> tuple[int, int, bool]:
    """(start, end inclusive, partial) for the request's Range against a blob of `size`."""
    try:
        span = parse_range(request.headers.get("Range"), size)
    except UnsatisfiableRange as exc:
        raise RegistryError(
            ErrorCode.RANGE_INVALID, headers={"Content-Range": f"bytes */{size}"}
        ) from exc
    return (span[0], span[1], True) if span else (0, size - 1, False)


def _start_response(
    headers: dict[str, str], start: int, end: int, size: int, partial: bool
) -> web.StreamResponse:
    response = web.StreamResponse(status=206 if partial else 200, headers=headers)
    if partial:
        response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    response.content_length = end - start + 1
    return response


async def _send_cached(
    request: web.Request, blob: CachedBlob, digest: Digest, headers: dict[str, str]
) -> web.StreamResponse:
    start, end, partial = _span(request, blob.size)
    response = _start_response(headers, start, end, blob.size, partial)
    sent = Sent()
    try:
        with request.app[blobs_key].serving(digest):  # pinned: eviction passes it over
            await send_file(
                request, blob.path, start, end, response, request.app[sendfile_pool_key], sent
            )
    except ConnectionError:
        drop(request)  # hung up, or stopped reading: normal, and nothing more can reach it
    finally:
        request.app[metrics_key].served_bytes.labels("cache").inc(sent.bytes)
        request[sent_key] = sent.bytes
    return response


async def _stream_live(
    request: web.Request, live: LiveBlob, headers: dict[str, str]
) -> web.StreamResponse:
    try:
        start, end, partial = _span(request, live.size)
        if start > end:  # an empty blob: nothing to hold back, so the verdict comes first
            await live.reader.verdict()
    except DownloadFailed as exc:
        live.reader.close()
        raise to_registry_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
    except BaseException:
        live.reader.close()
        raise
    response = _start_response(headers, start, end, live.size, partial)
    sent = Sent()
    guard = StallGuard(request.transport, idle_timeout(request))
    try:
        await response.prepare(request)  # inside: a client gone already must not leak the fd
        async with contextlib.aclosing(live.reader.chunks(start, end + 1)) as chunks:
            async for chunk in chunks:
                guard.written += len(chunk)
                await response.write(chunk)
                sent.bytes += len(chunk)
                if live.reader.whole_on_disk and end + 1 - start - sent.bytes >= _SENDFILE_SWITCH:
                    break  # verified and on disk: let the kernel send the rest
        pos = start + sent.bytes
        if pos <= end:
            await send_rest(
                request, live.reader.fd, pos, end + 1 - pos, request.app[sendfile_pool_key], sent
            )
        await response.write_eof()
    except DownloadFailed as exc:
        # Headers are out: the only honest signal left is a body short of Content-Length,
        # ended with a FIN (containerd retries with Range; a reset would be fatal for it).
        # Raising would let the middleware write an error response into this body, whose
        # first bytes could complete Content-Length: a whole, wrong blob with a 200.
        log.warning("blob_stream_aborted", digest=headers["Docker-Content-Digest"], error=str(exc))
        request[result_key] = "error"
        response.force_close()  # no keep-alive: aiohttp closes the connection after this reply
    except ConnectionError:
        drop(request)  # hung up, or stopped reading: the reader and its fd go at once
    finally:
        guard.close()
        live.reader.close()
        request.app[metrics_key].served_bytes.labels("upstream").inc(sent.bytes)
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
