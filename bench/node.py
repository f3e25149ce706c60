"""A simulated fresh node: the requests containerd's CRI path sends to pull one image.

In order: HEAD the tag (the one request a cached pull needs), GET the index by digest, pick
the linux/amd64 manifest and GET it, GET the config, then the layers, at most `parallel` at
once (CRI's max_concurrent_downloads is 3). Every body is read through one token bucket per
node (its NIC), every length is checked, and a node with `verify` hashes every blob (the
others check only the small manifests and config: hashing every byte of every node would
measure the load generator, not the server). A 429 is retried at once, six attempts in all,
as containerd does; then the node has failed, as a kubelet's pull would (ImagePullBackOff).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .clients import HASH_BATCH, MANIFEST_ACCEPT, hash_batch
from .pacing import TokenBucket

ATTEMPTS_429 = 6  # containerd: immediate retries, no backoff, Retry-After ignored
READ_BUFSIZE = 256 * 1024


@dataclass(frozen=True)
class NodePlan:
    base: str  # the target's URL, e.g. http://127.0.0.1:5000
    name: str  # repository
    tag: str
    ns: str | None  # containerd's ?ns=<registry> on requests to a mirror; None to an origin
    nic_rate: float  # bytes/s for the whole node; 0 = unpaced
    verify: bool
    parallel: int = 3
    timeout: float = 900.0


class PullFailed(Exception):
    """One request of a pull went wrong; `reason` is the failure class the tables count."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class NodeResult:
    kind: str = "sim"  # sim | ctr
    start: float = 0.0  # seconds after the burst began
    seconds: float = float("nan")  # first request -> last byte of the last layer
    ok: bool = False
    reason: str = ""  # "" | 429 | 5xx | 4xx | digest | length | error
    detail: str = ""
    bytes: int = 0
    requests: list[str] = field(default_factory=list)  # "HEAD manifest <ref>", ...


def reason_for_status(status: int) -> str:
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    return "4xx"


class _Pull:
    def __init__(
        self,
        plan: NodePlan,
        session: aiohttp.ClientSession,
        hash_pool: Executor | None,
        result: NodeResult,
    ) -> None:
        self.plan = plan
        self.session = session
        self.hash_pool = hash_pool
        self.result = result
        self.nic = TokenBucket(plan.nic_rate, READ_BUFSIZE)
        self.params = {"ns": plan.ns} if plan.ns else {}

    def _url(self, kind: str, ref: str) -> str:
        return f"{self.plan.base}/v2/{self.plan.name}/{kind}/{ref}"

    async def _open(self, method: str, kind: str, ref: str, accept: str) -> aiohttp.ClientResponse:
        """Send one request (429s retried as containerd retries them); a 2xx response."""
        for _ in range(ATTEMPTS_429):
            self.result.requests.append(f"{method} {kind[:-1]} {ref}")
            resp = await self.session.request(
                method,
                self._url(kind, ref),
                params=self.params,
                headers={"Accept": accept},
                allow_redirects=True,
            )
            if resp.status == 429:
                resp.release()
                continue
            if resp.status >= 300:
                resp.release()
                raise PullFailed(reason_for_status(resp.status), f"{method} {ref}: {resp.status}")
            return resp
        raise PullFailed("429", f"{method} {ref}: 429 x{ATTEMPTS_429}")

    async def _small(self, kind: str, digest: str, media_type: str) -> bytes:
        """A manifest or config by digest: read whole, digest checked (containerd does too)."""
        async with await self._open("GET", kind, digest, f"{media_type}, */*") as resp:
            body = await resp.read()
        self.result.bytes += len(body)
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise PullFailed("digest", f"{kind[:-1]} {digest}")
        return body

    async def _layer(self, desc: dict[str, Any]) -> None:
        digest, size = desc["digest"], int(desc["size"])
        loop = asyncio.get_running_loop()
        h = hashlib.sha256() if self.plan.verify else None
        got, batch, batched = 0, [], 0
        async with await self._open("GET", "blobs", digest, f"{desc['mediaType']}, */*") as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and int(length) != size:
                raise PullFailed("length", f"{digest[:19]}: Content-Length {length} != {size}")
            for _ in range(size // 1024 + 2):  # bounded: every read returns at least 1 KiB
                chunk = await resp.content.readany()
                if not chunk:
                    break
                got += len(chunk)
                self.result.bytes += len(chunk)
                if h is not None:
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= HASH_BATCH:
                        await loop.run_in_executor(self.hash_pool, hash_batch, h, batch)
                        batch, batched = [], 0
                wait = self.nic.take(loop.time(), len(chunk))
                if wait > 0:
                    await asyncio.sleep(wait)
                if got > size:
                    break
        if got != size:
            raise PullFailed("length", f"{digest[:19]}: {got} bytes, want {size}")
        if h is not None:
            if batch:
                await loop.run_in_executor(self.hash_pool, hash_batch, h, batch)
            if "sha256:" + h.hexdigest() != digest:
                raise PullFailed("digest", digest[:19])

    async def run(self) -> None:
        plan = self.plan
        async with await self._open("HEAD", "manifests", plan.tag, MANIFEST_ACCEPT) as resp:
            digest = resp.headers.get("Docker-Content-Digest")
            media_type = resp.headers.get("Content-Type", "")
        if not digest:  # containerd repeats a HEAD without a digest as a GET of the tag
            async with await self._open("GET", "manifests", plan.tag, MANIFEST_ACCEPT) as resp:
                body = await resp.read()
                media_type = resp.headers.get("Content-Type", "")
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
        doc = json.loads(await self._small("manifests", digest, media_type))
        if "manifests" in doc:  # an index: take what a linux/amd64 node takes
            chosen = next(
                (
                    m
                    for m in doc["manifests"]
                    if m.get("platform", {}).get("os") == "linux"
                    and m.get("platform", {}).get("architecture") == "amd64"
                ),
                None,
            )
            if chosen is None:
                raise PullFailed("4xx", "no linux/amd64 manifest in the index")
            doc = json.loads(await self._small("manifests", chosen["digest"], chosen["mediaType"]))
        config = doc["config"]
        await self._small("blobs", config["digest"], config["mediaType"])
        gate = asyncio.Semaphore(plan.parallel)

        async def one(desc: dict[str, Any]) -> None:
            async with gate:
                await self._layer(desc)

        # containerd fails the pull at the first broken layer; the others are abandoned.
        tasks = [asyncio.create_task(one(d)) for d in doc["layers"]]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def pull(plan: NodePlan, hash_pool: Executor | None = None) -> NodeResult:
    """Pull the image as one fresh node; never raises, the result says what happened."""
    result = NodeResult()
    connector = aiohttp.TCPConnector(limit=plan.parallel + 1)
    t0 = time.perf_counter()
    try:
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=plan.timeout),
            auto_decompress=False,
            read_bufsize=READ_BUFSIZE,
        ) as session:
            await _Pull(plan, session, hash_pool, result).run()
        result.ok = True
    except PullFailed as exc:
        result.reason, result.detail = exc.reason, exc.detail
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
        result.reason, result.detail = "error", f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - t0
    return result
