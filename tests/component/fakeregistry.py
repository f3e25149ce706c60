"""An in-process fake OCI registry with bearer or ECR-like basic auth, a CDN for redirects,
faults and a request log.

    registry  GET|HEAD /v2/<name>/manifests/<tag|digest>, /v2/<name>/blobs/<digest>,
              GET /v2/<name>/tags/list, GET /token, GET /v2/ (faults apply to it as "base")
    cdn       GET|HEAD /cdn/<digest>: where blobs redirect to in redirect mode (a manifest by
              digest too); like a presigned S3 URL it answers 400 to any request that
              carries an Authorization header

Every request is logged (`FakeRegistry.log`) with its kind (manifest-tag, manifest-digest,
blob, tags, token, cdn, base), Range, Authorization and the body bytes actually sent, so tests can
count what the mirror asked for. Faults are named and matched per request (`FakeRegistry.fault`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.test_utils import TestServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SERVICE = "fake"
WRITE_SIZE = 16 * 1024  # the fake writes bodies in pieces this big, so faults land precisely

MODES = frozenset(
    {
        "slow",  # wait `delay` seconds before the headers
        "hold",  # wait before the headers until `release()`: a gate for the test to open
        "silent",  # never send headers (until the fake shuts down)
        "slow_body",  # send the body at `rate` bytes per second
        "cut",  # send `after` bytes of the body, then close the connection cleanly (FIN)
        "stall",  # send `after` bytes, then wait until `release()` (or shutdown)
        "wrong_bytes",  # flip the byte at blob offset `position`
        "status",  # answer `status` (404, 500, 429 + Retry-After: `retry_after`) instead,
        # with OCI error code `code` if given
        "ignore_range",  # answer every Range request with 200 and the whole body
        "first_range_only",  # honour a Range from byte 0; answer any other with 200, whole
        "drip",  # send the body in writes of `rate` bytes, `delay` seconds apart
        "challenge",  # answer 401 with `WWW-Authenticate: <challenge>` (a CDN can, too)
        "redirect",  # answer 307 to `location`, with "{registry}", "{cdn}", "{ref}" filled in
    }
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Fault:
    """One named failure mode, applied to the requests it matches, `times` times (None: always)."""

    mode: str
    kind: str | None = None  # manifest-tag | manifest-digest | blob | tags | token | cdn | base
    ref: str | None = None  # a tag or digest; None = any
    range_start: int | None = None  # only requests whose Range starts at this byte
    method: str | None = None
    times: int | None = None
    delay: float = 0.0
    rate: int = 0
    after: int = 0
    position: int = 0
    status: int = 500
    retry_after: str | None = None
    code: str | None = None  # the OCI error code a "status" fault answers with
    challenge: str = ""
    location: str = ""  # where a "redirect" fault sends the client
    hits: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # hold, stall: pause began
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, rec: Request) -> bool:
        return (
            (self.times is None or self.hits < self.times)
            and (self.kind is None or self.kind == rec.kind)
            and (self.ref is None or self.ref == rec.ref)
            and (self.method is None or self.method == rec.method)
            and (self.range_start is None or self.range_start == rec.range_start)
        )

    def release(self) -> None:
        self._released.set()


@dataclass
class Request:
    host: str  # registry | cdn
    method: str
    kind: str
    name: str
    ref: str
    range: str | None
    authorization: str | None
    accept: list[str]
    query: dict[str, str]
    status: int = 0
    sent: int = 0  # body bytes written so far
    faults: list[str] = field(default_factory=list)

    @property
    def range_start(self) -> int | None:
        span = _parse_range_header(self.range)
        return None if span is None else span[0]


@dataclass
class Repo:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _parse_range_header(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", (value or "").strip())
    if not m:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


class FakeRegistry:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self.faults: list[Fault] = []
        self.auth = False  # Docker-Hub-like bearer tokens on every /v2/ request
        # ECR-like Basic auth on every /v2/ request: only this (user, password) gets in.
        self.basic: tuple[str, str] | None = None
        self.token_lifetime = 300
        self.redirect = False  # blob GETs answer 307 to the cdn
        self.ignore_accept = False  # tags answer their own manifest whatever Accept says
        self.blob_streams = 0  # blob bodies being sent right now ...
        self.peak_blob_streams = 0  # ... and the most at once
        # The actions the challenge asks for and a token must have ("pull,push": as some
        # registries answer a pull), and headers added to every registry response.
        self.actions = "pull"
        self.response_headers: dict[str, str] = {}
        self.tag_links = False  # a paged tag list links its next page, as Distribution does
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (scope, expires at)
        self._closing = asyncio.Event()
        self._registry: TestServer | None = None
        self._cdn: TestServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        registry = web.Application()
        registry.on_response_prepare.append(self._add_response_headers)
        registry.router.add_get("/token", self._token)
        registry.router.add_get("/v2/", self._base)
        registry.router.add_get(r"/v2/{name:.+}/manifests/{ref}", self._manifest)
        registry.router.add_get(r"/v2/{name:.+}/blobs/{ref}", self._blob)
        registry.router.add_get(r"/v2/{name:.+}/tags/list", self._tags)
        cdn = web.Application()
        cdn.router.add_get("/cdn/{ref}", self._cdn_blob)
        self._registry = TestServer(registry, host="127.0.0.1")
        self._cdn = TestServer(cdn, host="127.0.0.1")
        await self._registry.start_server()
        await self._cdn.start_server()

    async def close(self) -> None:
        self._closing.set()  # silent and stalled handlers return, so shutdown is quick
        for fault in self.faults:
            fault.release()
        for server in (self._registry, self._cdn):
            if server is not None:
                await server.close()

    @property
    def url(self) -> str:
        assert self._registry is not None
        return f"http://127.0.0.1:{self._registry.port}"

    @property
    def cdn_url(self) -> str:
        assert self._cdn is not None
        return f"http://127.0.0.1:{self._cdn.port}"

    @property
    def cdn_port(self) -> int:
        assert self._cdn is not None and self._cdn.port is not None
        return self._cdn.port

    # -- content ------------------------------------------------------------------------------

    def add_blob(self, name: str, data: bytes) -> str:
        digest = sha256(data)
        self.repos.setdefault(name, Repo()).blobs[digest] = data
        return digest

    def add_manifest(
        self, name: str, body: bytes, media_type: str = OCI_MANIFEST, tag: str | None = None
    ) -> str:
        digest = sha256(body)
        repo = self.repos.setdefault(name, Repo())
        repo.manifests[digest] = (body, media_type)
        if tag is not None:
            repo.tags[tag] = digest
        return digest

    def add_image(self, name: str, tag: str, layers: Iterable[bytes]) -> Image:
        """An OCI image manifest with a small config and the given layers, tagged."""
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        config_digest = self.add_blob(name, config)
        descs = []
        layer_digests = []
        for data in layers:
            digest = self.add_blob(name, data)
            layer_digests.append(digest)
            descs.append({"mediaType": OCI_LAYER, "digest": digest, "size": len(data)})
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": descs,
            },
            indent=2,  # a registry's exact bytes, not a canonical re-encoding, must be served
        ).encode()
        digest = self.add_manifest(name, body, OCI_MANIFEST, tag)
        return Image(name, tag, digest, body, config_digest, layer_digests)

    # -- faults -------------------------------------------------------------------------------

    def fault(self, mode: str, **kwargs: Any) -> Fault:
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        fault = Fault(mode, **kwargs)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        for fault in self.faults:
            fault.release()
        self.faults.clear()

    def _apply(self, rec: Request) -> dict[str, Fault]:
        active: dict[str, Fault] = {}
        for fault in self.faults:
            if fault.mode not in active and fault.matches(rec):
                fault.hits += 1
                active[fault.mode] = fault
                rec.faults.append(fault.mode)
        return active

    # -- counters -----------------------------------------------------------------------------

    def requests(
        self,
        kind: str | None = None,
        method: str | None = None,
        ranged: bool | None = None,
        host: str | None = None,
    ) -> list[Request]:
        return [
            r
            for r in self.log
            if (kind is None or r.kind == kind)
            and (method is None or r.method == method)
            and (ranged is None or (r.range is not None) == ranged)
            and (host is None or r.host == host)
        ]

    def count(self, kind: str | None = None, method: str | None = None, **kw: Any) -> int:
        return len(self.requests(kind, method, **kw))

    @property
    def counts(self) -> Counter[tuple[str, str, str]]:
        """(method, kind, "range" | "full") -> number of requests."""
        return Counter((r.method, r.kind, "range" if r.range else "full") for r in self.log)

    def body_bytes(self, *kinds: str) -> int:
        """Body bytes actually written for requests of these kinds (blob and cdn by default)."""
        wanted = kinds or ("blob", "cdn")
        return sum(r.sent for r in self.log if r.kind in wanted)

    def download_sessions(self) -> int:
        """GETs of blob bytes starting at byte 0: every download of a whole blob begins so."""
        return sum(
            1
            for r in self.log
            if r.method == "GET"
            and r.status in (200, 206)
            and (r.kind == "cdn" or (r.kind == "blob" and not self.redirect))
            and (r.range_start in (None, 0))
        )

    def reset_log(self) -> None:
        self.log.clear()

    # -- handlers -----------------------------------------------------------------------------

    async def _add_response_headers(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        response.headers.update(self.response_headers)

    def _record(self, request: web.Request, host: str, kind: str, name: str, ref: str) -> Request:
        rec = Request(
            host=host,
            method=request.method,
            kind=kind,
            name=name,
            ref=ref,
            range=request.headers.get("Range"),
            authorization=request.headers.get("Authorization"),
            accept=request.headers.getall("Accept", []),
            query=dict(request.query),
        )
        self.log.append(rec)
        return rec

    def _authorized(self, request: web.Request, name: str) -> bool:
        if self.basic is not None:
            expected = base64.b64encode(":".join(self.basic).encode()).decode()
            return request.headers.get("Authorization") == f"Basic {expected}"
        if not self.auth:
            return True
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        scope, expires = self.tokens.get(header[7:], ("", 0.0))
        return time.monotonic() < expires and scope in ("*", f"repository:{name}:{self.actions}")

    def _challenge(self, rec: Request, name: str) -> web.Response:
        rec.status = 401
        if self.basic is not None:  # as ECR asks
            challenge = f'Basic realm="{self.url}/",service="ecr.amazonaws.com"'
            return _error(401, "DENIED", "Not Authorized", {"WWW-Authenticate": challenge})
        scope = f',scope="repository:{name}:{self.actions}"' if name else ""
        return _error(
            401,
            "UNAUTHORIZED",
            "authentication required",
            {"WWW-Authenticate": f'Bearer realm="{self.url}/token",service="{SERVICE}"{scope}'},
        )

    async def _admit(
        self, request: web.Request, host: str, kind: str, name: str, ref: str
    ) -> tuple[Request, dict[str, Fault], web.Response | None]:
        """Log the request, pick its faults, and play those that act before the headers."""
        rec = self._record(request, host, kind, name, ref)
        faults = self._apply(rec)
        return rec, faults, await self._before_headers(rec, faults)

    async def _before_headers(self, rec: Request, faults: dict[str, Fault]) -> web.Response | None:
        if "slow" in faults:
            await asyncio.sleep(faults["slow"].delay)
        if "hold" in faults:
            faults["hold"].reached.set()
            await faults["hold"]._released.wait()  # close() releases every fault
        if "silent" in faults:
            await self._closing.wait()
            rec.status = 503
            return _error(503, "UNAVAILABLE", "fake registry shutting down")
        if "status" in faults:
            f = faults["status"]
            rec.status = f.status
            headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
            code = f.code or {404: "NOT_FOUND", 429: "TOOMANYREQUESTS"}.get(f.status, "UNKNOWN")
            return _error(f.status, code, f"injected {f.status}", headers)
        if "redirect" in faults:
            rec.status = 307
            location = faults["redirect"].location.format(
                registry=self.url, cdn=self.cdn_url, ref=rec.ref
            )
            return web.Response(status=307, headers={"Location": location})
        if "challenge" in faults:
            rec.status = 401
            challenge = {"WWW-Authenticate": faults["challenge"].challenge}
            return _error(401, "UNAUTHORIZED", "injected challenge", challenge)
        return None

    async def _token(self, request: web.Request) -> web.Response:
        rec, faults, early = await self._admit(request, "registry", "token", "", "")
        if early is not None:
            return early
        if request.query.get("service") != SERVICE:
            rec.status = 400
            return _error(400, "DENIED", "wrong service")
        scope = request.query.get("scope", "")
        token = secrets.token_hex(16)
        self.tokens[token] = (scope, time.monotonic() + self.token_lifetime)
        rec.status = 200
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": self.token_lifetime}
        )

    async def _base(self, request: web.Request) -> web.Response:
        rec, faults, early = await self._admit(request, "registry", "base", "", "")
        if early is not None:
            return early
        if not self._authorized(request, ""):
            return self._challenge(rec, "")
        rec.status = 200
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        name, ref = request.match_info["name"], request.match_info["ref"]
        kind = "manifest-digest" if ref.startswith("sha256:") else "manifest-tag"
        rec, faults, early = await self._admit(request, "registry", kind, name, ref)
        if early is not None:
            return early
        if not self._authorized(request, name):
            return self._challenge(rec, name)
        repo = self.repos.get(name)
        digest = repo.tags.get(ref, ref) if repo else ref
        if repo is None or digest not in repo.manifests:
            rec.status = 404
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        body, media_type = repo.manifests[digest]
        if (
            kind == "manifest-tag"
            and not self.ignore_accept
            and not _accepts(rec.accept, media_type)
        ):
            # Like Distribution and Docker Hub: a client that rejects the tag's index gets the
            # linux/amd64 manifest instead, when it accepts that.
            child = _default_platform_child(body, media_type)
            if child is None or not _accepts(rec.accept, repo.manifests[child][1]):
                rec.status = 404
                return _error(404, "MANIFEST_UNKNOWN", "manifest type not accepted")
            digest = child
            body, media_type = repo.manifests[digest]
        rec.status = 200
        if request.method == "GET":
            rec.sent = len(body)
        return web.Response(
            body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": digest}
        )

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        rec, faults, early = await self._admit(request, "registry", "tags", name, "")
        if early is not None:
            return early
        if not self._authorized(request, name):
            return self._challenge(rec, name)
        repo = self.repos.get(name)
        if repo is None:
            rec.status = 404
            return _error(404, "NAME_UNKNOWN", "repository name not known to registry")
        tags = sorted(repo.tags)
        if "last" in request.query:
            tags = [t for t in tags if t > request.query["last"]]
        headers = {}
        if "n" in request.query:
            more = len(tags) > int(request.query["n"])
            tags = tags[: int(request.query["n"])]
            if self.tag_links and more and tags:
                query = urlencode({"last": tags[-1], "n": request.query["n"]})
                headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
        rec.status = 200
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        name, ref = request.match_info["name"], request.match_info["ref"]
        rec, faults, early = await self._admit(request, "registry", "blob", name, ref)
        if early is not None:
            return early
        if not self._authorized(request, name):
            return self._challenge(rec, name)
        repo = self.repos.get(name)
        if repo is None or ref not in repo.blobs:
            rec.status = 404
            return _error(404, "BLOB_UNKNOWN", "blob unknown")
        if self.redirect:
            rec.status = 307
            location = f"{self.cdn_url}/cdn/{ref}?X-Amz-Signature={secrets.token_hex(8)}"
            return web.Response(status=307, headers={"Location": location})
        self.blob_streams += 1
        self.peak_blob_streams = max(self.peak_blob_streams, self.blob_streams)
        try:
            return await self._send_blob(request, rec, repo.blobs[ref], faults)
        finally:
            self.blob_streams -= 1

    async def _cdn_blob(self, request: web.Request) -> web.StreamResponse:
        ref = request.match_info["ref"]
        rec, faults, early = await self._admit(request, "cdn", "cdn", "", ref)
        if early is not None:
            return early
        if "Authorization" in request.headers:  # presigned URLs refuse a second credential
            rec.status = 400
            return _error(400, "InvalidArgument", "Only one auth mechanism allowed")
        data = next((r.blobs[ref] for r in self.repos.values() if ref in r.blobs), None)
        manifest = next((r.manifests[ref] for r in self.repos.values() if ref in r.manifests), None)
        if data is None and manifest is not None:
            rec.status = 200
            headers = {"Content-Type": manifest[1], "Docker-Content-Digest": ref}
            return web.Response(body=manifest[0], headers=headers)
        if data is None:
            rec.status = 404
            return _error(404, "NoSuchKey", "no such key")
        return await self._send_blob(request, rec, data, faults)

    async def _send_blob(
        self, request: web.Request, rec: Request, data: bytes, faults: dict[str, Fault]
    ) -> web.StreamResponse:
        size = len(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": rec.ref,
            "Accept-Ranges": "bytes",
        }
        span = None if "ignore_range" in faults else _parse_range_header(rec.range)
        if "first_range_only" in faults and span is not None and span[0] != 0:
            span = None
        status = 200
        start, end = 0, size - 1
        if span is not None:
            start = span[0]
            end = size - 1 if span[1] is None else min(span[1], size - 1)
            if start >= size:
                rec.status = 416
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        rec.status = status
        if request.method == "HEAD":
            return web.Response(status=status, headers={**headers, "Content-Length": str(size)})
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start + 1
        await response.prepare(request)
        body = memoryview(data)[start : end + 1]
        if "wrong_bytes" in faults:
            at = faults["wrong_bytes"].position - start
            if 0 <= at < len(body):
                corrupt = bytearray(body)
                corrupt[at] ^= 0xFF
                body = memoryview(bytes(corrupt))
        limit = len(body)
        for mode in ("cut", "stall"):
            if mode in faults:
                limit = min(limit, faults[mode].after)
        rate = faults["slow_body"].rate if "slow_body" in faults else 0
        piece = max(1, rate // 50) if rate else WRITE_SIZE
        drip = faults.get("drip")
        if drip is not None:
            piece = drip.rate
        pos = 0
        while pos < limit:
            chunk = bytes(body[pos : min(pos + piece, limit)])
            await response.write(chunk)
            pos += len(chunk)
            rec.sent = pos
            if rate:
                await asyncio.sleep(len(chunk) / rate)
            elif drip is not None:
                await asyncio.sleep(drip.delay)
        if "stall" in faults and pos < len(body):
            stall = faults["stall"]
            stall.reached.set()
            await stall._released.wait()  # close() releases every fault
            while pos < len(body) and not self._closing.is_set():
                chunk = bytes(body[pos : pos + WRITE_SIZE])
                await response.write(chunk)
                pos += len(chunk)
                rec.sent = pos
        if pos < len(body):
            # Headers promised more: end the connection with a FIN, like a proxy that gave up.
            response.force_close()
            return response
        await response.write_eof()
        return response


@dataclass(frozen=True)
class Image:
    name: str
    tag: str
    digest: str
    manifest: bytes
    config: str
    layers: list[str]


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return web.Response(
        status=status, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )


def _accepts(accept: list[str], media_type: str) -> bool:
    types = {t.split(";")[0].strip() for v in accept for t in v.split(",") if t.strip()}
    return not types or "*/*" in types or media_type in types


def _default_platform_child(body: bytes, media_type: str) -> str | None:
    if media_type not in (OCI_INDEX, DOCKER_LIST):
        return None
    for desc in json.loads(body).get("manifests", []):
        platform = desc.get("platform", {})
        if (platform.get("os"), platform.get("architecture")) == ("linux", "amd64"):
            return str(desc["digest"])
    return None
