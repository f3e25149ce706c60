"""The operator API: cache warming jobs, on the admin listener only, behind the admin token
when one is set."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from mirror.cache.warming import KEEP_JOBS, InvalidWarmRequest, WarmBusy, WarmService
from mirror.keys import (
    blobs_key,
    config_key,
    kind_key,
    manifests_key,
    metrics_key,
    services_key,
    warm_key,
)
from mirror.oci.errors import ErrorCode, RegistryError

log = structlog.get_logger("mirror.admin")

# Above the app-wide client_max_size on purpose: 500 digest-pinned references fill ~64 KiB.
MAX_BODY = 1024 * 1024
_FIELDS = frozenset({"images", "platforms"})


def add_warm_service(app: web.Application) -> None:
    """The WarmService's lifetime, on the registry app: call after create_app's own
    cleanup_ctx entry is in place, since it is built from the blob and manifest services
    (and so its jobs are cancelled before those close)."""
    app.cleanup_ctx.append(warm_ctx)


def add_admin_routes(admin: web.Application) -> None:
    """The routes, on the admin app, whose `services_key` names the registry app: started
    after it, the admin app finds the warm service there."""
    admin.cleanup_ctx.append(_bind_warm)
    admin.router.add_post("/admin/warm", submit_warm)
    admin.router.add_get("/admin/warm", list_warm, allow_head=False)
    admin.router.add_get("/admin/warm/{job_id}", get_warm, allow_head=False)


async def _bind_warm(admin: web.Application) -> AsyncIterator[None]:
    admin[warm_key] = admin[services_key][warm_key]
    yield


async def warm_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[config_key]
    warm = WarmService(
        app[manifests_key],
        app[blobs_key],
        config.warm,
        app[metrics_key],
        config.default_registry,
        frozenset(config.registries),
        time.time,
    )
    app[warm_key] = warm
    if not config.server.admin_token:
        log.warning(
            "admin_api_without_token",
            listen=f"{config.server.admin_host}:{config.server.admin_port}",
            hint="anyone on this machine can start warm jobs; set server.admin_token",
        )
    try:
        yield
    finally:
        await warm.close()


def _authorize(request: web.Request) -> None:
    request[kind_key] = "admin"
    token = request.app[config_key].server.admin_token
    if not token:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Bytes, so that a non-ASCII header cannot make compare_digest raise (aiohttp hands such
    # bytes over as surrogate escapes).
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(errors="surrogateescape"), token.encode()
    ):
        raise RegistryError(
            ErrorCode.UNAUTHORIZED,
            "the admin API needs Authorization: Bearer <admin token>",
            headers={"WWW-Authenticate": 'Bearer realm="mirror-admin"'},
        )


def _bad(message: str, detail: Any = None) -> RegistryError:
    return RegistryError(ErrorCode.BAD_REQUEST, message, detail)


async def _read_body(request: web.Request) -> bytes:
    too_large = RegistryError(
        ErrorCode.BAD_REQUEST, f"the body is larger than {MAX_BODY} bytes", status=413
    )
    if (request.content_length or 0) > MAX_BODY:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY:
            raise too_large
    return bytes(body)


def _string_list(doc: dict[str, Any], key: str) -> list[str] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{key} must be a list of strings")
    return value


async def submit_warm(request: web.Request) -> web.Response:
    _authorize(request)
    body = await _read_body(request)
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the body is not JSON: {exc}") from exc
    except RecursionError as exc:  # the parser recurses per level: b"[" * 100000 gets here
        raise _bad("the body is not a warm request: JSON nested too deeply") from exc
    if not isinstance(doc, dict):
        raise _bad('the body must be a JSON object: {"images": [...], "platforms": [...]}')
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise _bad(f"unknown fields: {', '.join(unknown)}", {"allowed": sorted(_FIELDS)})
    images = _string_list(doc, "images")
    if images is None:
        raise _bad("images is required: a list of image references")
    try:
        job = request.app[warm_key].submit(images, _string_list(doc, "platforms"))
    except InvalidWarmRequest as exc:
        raise _bad(str(exc), {"problems": exc.problems}) from exc
    except WarmBusy as exc:
        raise RegistryError(ErrorCode.UNAVAILABLE, str(exc)) from exc
    status_url = f"/admin/warm/{job.id}"
    return web.json_response(
        {"id": job.id, "status_url": status_url, "images": len(job.images)},
        status=202,
        headers={"Location": status_url},
    )


async def get_warm(request: web.Request) -> web.Response:
    _authorize(request)
    job = request.app[warm_key].get(request.match_info["job_id"])
    if job is None:
        raise RegistryError(
            ErrorCode.NOT_FOUND, f"no such warm job (the last {KEEP_JOBS} are kept)"
        )
    return web.json_response(job.to_json())


async def list_warm(request: web.Request) -> web.Response:
    _authorize(request)
    jobs = request.app[warm_key].list()
    return web.json_response({"jobs": [job.to_json(with_images=False) for job in jobs]})
