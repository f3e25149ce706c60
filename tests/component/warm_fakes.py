"""A small fake registry for the warm tests (multi-arch images, a request log, held blobs),
and the mirror's two apps (registry and admin) in front of it.

    GET|HEAD /v2/<name>/manifests/<tag|digest>   tags per repository, content by digest
    GET|HEAD /v2/<name>/blobs/<digest>           Range answered with 206

`hold(digest)` makes the next GET of a blob send half its body and wait for `release()`, so
a test can join a download while it is provably in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.app import create_admin_app, create_app
from mirror.config import CacheConfig, Config, RegistryConfig, ServerConfig

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Logged:
    method: str
    kind: str  # manifest | blob
    name: str
    ref: str  # tag or digest


@dataclass
class PlatformImage:
    platform: str
    manifest: str  # digest of its image manifest
    blobs: list[str]  # config, then layers
    sizes: dict[str, int]


@dataclass
class MultiArch:
    name: str
    tag: str
    index: str
    platforms: dict[str, PlatformImage]


@dataclass
class Hold:
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


class WarmRegistry:
    def __init__(self) -> None:
        self.url = ""  # set once served
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.log: list[Logged] = []
        self.holds: dict[str, Hold] = {}
        self.headers: dict[str, str] = {}  # added to every answer, e.g. ratelimit-remaining
        self.manifest_status: int | None = None  # e.g. 429: every manifest request is refused

    # -- content -----------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, doc: dict[str, object], media_type: str) -> tuple[str, int]:
        body = json.dumps(doc, indent=2).encode()
        digest = sha256(body)
        self.manifests[digest] = (body, media_type)
        return digest, len(body)

    def image(
        self, name: str, tag: str, platforms: Sequence[str], layer_sizes: Sequence[int] = (3000,)
    ) -> MultiArch:
        """An index over one image per platform; every blob differs between platforms."""
        entries = []
        images = {}
        for p in platforms:
            os_, arch, *variant = p.split("/")
            config = json.dumps({"architecture": arch, "os": os_, "variant": p}).encode()
            layers = [
                random.Random(f"{name}:{tag}:{p}:{n}").randbytes(size)
                for n, size in enumerate(layer_sizes)
            ]
            blobs = [self.add_blob(config), *(self.add_blob(layer) for layer in layers)]
            sizes = {d: len(self.blobs[d]) for d in blobs}
            manifest, size = self.add_manifest(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {
                        "mediaType": OCI_CONFIG,
                        "digest": blobs[0],
                        "size": sizes[blobs[0]],
                    },
                    "layers": [
                        {"mediaType": OCI_LAYER, "digest": d, "size": sizes[d]} for d in blobs[1:]
                    ],
                },
                OCI_MANIFEST,
            )
            platform: dict[str, str] = {"os": os_, "architecture": arch}
            if variant:
                platform["variant"] = variant[0]
            entries.append(
                {"mediaType": OCI_MANIFEST, "digest": manifest, "size": size, "platform": platform}
            )
            images[p] = PlatformImage(p, manifest, blobs, sizes)
        index, _ = self.add_manifest(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX
        )
        self.tags[(name, tag)] = index
        return MultiArch(name, tag, index, images)

    def hold(self, digest: str) -> Hold:
        self.holds[digest] = Hold()
        return self.holds[digest]

    def release_all(self) -> None:
        for hold in self.holds.values():
            hold.release()

    # -- what was asked ----------------------------------------------------------------------

    def count(self, kind: str | None = None, ref: str | None = None) -> int:
        return sum(
            (kind is None or r.kind == kind) and (ref is None or r.ref == ref) for r in self.log
        )

    # -- the server --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", self._handle)
        app.on_response_prepare.append(self._add_headers)
        return app

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(self.headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        for kind in ("manifests", "blobs"):
            name, sep, ref = tail.rpartition(f"/{kind}/")
            if sep:
                self.log.append(Logged(request.method, kind[:-1], name, ref))
                if kind == "manifests":
                    return self._manifest(name, ref)
                return await self._blob(request, ref)
        return _error(404, "NOT_FOUND")

    def _manifest(self, name: str, ref: str) -> web.Response:
        if self.manifest_status is not None:
            return _error(self.manifest_status, "TOOMANYREQUESTS")
        digest = ref if ref.startswith("sha256:") else self.tags.get((name, ref))
        found = self.manifests.get(digest or "")
        if digest is None or found is None:
            return _error(404, "MANIFEST_UNKNOWN")
        body, media_type = found
        return web.Response(
            body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": digest}
        )

    async def _blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        data = self.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN")
        start, end, status = 0, len(data), 200
        m = _RANGE.fullmatch(request.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            status = 206
        response = web.StreamResponse(status=status)
        response.content_type = "application/octet-stream"
        response.content_length = end - start
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        body = data[start:end]
        hold = self.holds.pop(digest, None)
        if hold is not None:
            half = len(body) // 2
            await response.write(body[:half])
            body = body[half:]
            hold.reached.set()
            await hold.released.wait()
        await response.write(body)
        await response.write_eof()
        return response


def _error(status: int, code: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": code.lower()}]}, status=status)


@dataclass
class MirrorClients:
    """One mirror as the tests reach it: the registry app and the admin app (each served on a
    port of its own, as `mirror serve` does), with /admin/... sent to the admin one."""

    registry: TestClient
    admin: TestClient

    @property
    def app(self) -> web.Application:
        return self.registry.app

    def _for(self, path: str) -> TestClient:
        return self.admin if path.startswith("/admin/") or path == "/admin" else self.registry

    def get(self, path: str, **kwargs: Any) -> Any:
        return self._for(path).get(path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> Any:
        return self._for(path).head(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self._for(path).post(path, **kwargs)


async def start_mirror_apps(serve_app: Any, config: Config) -> tuple[Any, Any]:
    """Both apps of a mirror on `serve_app` (pytest-aiohttp's aiohttp_client or
    aiohttp_server), the registry app first: the admin app uses its services."""
    app = create_app(config)
    registry = await serve_app(app)
    admin = await serve_app(create_admin_app(app))
    return registry, admin


def warm_config(
    cache: Path, upstream_url: str, admin_token: str | None = None, **cache_settings: Any
) -> Config:
    """fake.test is the one registry, and the default; cache_settings go to CacheConfig."""
    return Config(
        server=ServerConfig(admin_token=admin_token),
        cache=CacheConfig(directory=cache, **cache_settings),
        registries=MappingProxyType({"fake.test": RegistryConfig("fake.test", upstream_url)}),
        default_registry="fake.test",
    )


async def serve_registry(aiohttp_server: Any) -> WarmRegistry:
    """A WarmRegistry served by pytest-aiohttp's `aiohttp_server` fixture."""
    registry = WarmRegistry()
    server = await aiohttp_server(registry.app())
    registry.url = str(server.make_url("")).rstrip("/")
    return registry


async def serve_mirror(
    aiohttp_client: Any, cache: Path, upstream_url: str, **settings: Any
) -> MirrorClients:
    """The mirror in front of `upstream_url`, as clients of pytest-aiohttp's fixture."""
    registry, admin = await start_mirror_apps(
        aiohttp_client, warm_config(cache, upstream_url, **settings)
    )
    return MirrorClients(registry, admin)
