"""Operator endpoints: liveness, readiness and Prometheus metrics (none of them access-logged)."""

from __future__ import annotations

from aiohttp import web

from mirror.keys import metrics_key, store_key


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the config loaded (it did, or we would not be running) and the cache can be
    written: a read-only or vanished volume should take the pod out of the Service."""
    writable = await request.app[store_key].writable()
    body = {"status": "ok" if writable else "unavailable", "cache_writable": writable}
    return web.json_response(body, status=200 if writable else 503)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[metrics_key]
    body, content_type = m.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
