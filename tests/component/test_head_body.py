"""An upstream that sends a body after a HEAD answer (raw sockets: aiohttp's own server never
would). aiohttp parses HEAD answers without a body and pools the connection at once, so the
stray bytes are read as the next request's status line: that request fails with "Bad status
line", or they arrive with the headers and the HEAD itself fails."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .conftest import MakeMirror
from .harness import mirror_config

FAKE = {"ns": "fake.test"}
BLOB = b"layer bytes " * 100
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps({"schemaVersion": 2, "layers": []}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class HeadBodyUpstream:
    """Answers HEAD of the blob with its headers and then its body: at once ("same", one
    segment), or just before its answer to the next request on that connection ("late": the
    most damaging moment, made certain)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        owed = b""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
                self.requests.append(f"{method} {path}")
                writer.write(owed)
                owed = b""
                if method == "HEAD" and path.endswith(BLOB_DIGEST):
                    headers = _headers(200, len(BLOB), "application/octet-stream", BLOB_DIGEST)
                    if self.mode == "same":
                        writer.write(headers + BLOB)
                    else:
                        writer.write(headers)
                        owed = BLOB
                elif method == "GET" and path.endswith(MANIFEST_DIGEST):
                    writer.write(_headers(200, len(MANIFEST), OCI_MANIFEST, MANIFEST_DIGEST))
                    writer.write(MANIFEST)
                else:
                    writer.write(_headers(404, 0, "application/json", None))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _headers(status: int, length: int, content_type: str, digest: str | None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {length}", f"Content-Type: {content_type}"]
    if digest:
        lines.append(f"Docker-Content-Digest: {digest}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[HeadBodyUpstream]:
    """A HeadBodyUpstream in the mode the test is parametrized with (indirectly)."""
    server = HeadBodyUpstream(request.param)
    await server.start()
    yield server
    await server.close()


@pytest.mark.parametrize("upstream", ["late"], indirect=True)
async def test_a_body_after_a_head_never_reaches_the_next_request(
    upstream: HeadBodyUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    mirror = await make_mirror(config=mirror_config(tmp_path / "cache", upstream.url, retries=0))
    resp = await mirror.client.head(f"/v2/team/app/blobs/{BLOB_DIGEST}", params=FAKE)
    assert (resp.status, resp.headers["Content-Length"]) == (200, str(len(BLOB)))
    # What follows the HEAD on its connection would have been read as this answer.
    resp = await mirror.client.get(f"/v2/team/app/manifests/{MANIFEST_DIGEST}", params=FAKE)
    assert resp.status == 200, await resp.text()
    assert await resp.read() == MANIFEST
    assert upstream.connections == 2  # the HEAD's connection was not reused
    errors = mirror.metric(
        "mirror_upstream_requests_total", registry="fake.test", kind="manifest", status="error"
    )
    assert errors == 0


@pytest.mark.parametrize("upstream", ["same"], indirect=True)
async def test_a_head_answer_with_a_body_costs_the_breaker_one_request(
    upstream: HeadBodyUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """The HEAD itself fails, attempt after attempt (retries=2): one request for the breaker,
    which stays closed for everything else."""
    cfg = mirror_config(tmp_path / "cache", upstream.url, breaker_failures=2)
    mirror = await make_mirror(config=cfg)
    for _ in range(3):
        resp = await mirror.client.head(f"/v2/team/app/blobs/{BLOB_DIGEST}", params=FAKE)
        assert resp.status == 503
    assert upstream.requests.count(f"HEAD /v2/team/app/blobs/{BLOB_DIGEST}") == 9
    assert mirror.metric("mirror_upstream_breaker_open", registry="fake.test") == 0
    resp = await mirror.client.get(f"/v2/team/app/manifests/{MANIFEST_DIGEST}", params=FAKE)
    assert resp.status == 200
    assert await resp.read() == MANIFEST
