"""Copies of committed blobs to the region's bucket, in the background, never delaying a client.

A bounded queue (what does not fit is dropped and counted: the bucket is a cache, the next
fill of that blob queues it again), a few workers, retries with backoff, and a memory budget:
a blob travels in parts read from the local file, so however many uploads run, the bytes in
memory stay near one multipart threshold. The local copy is hashed as it is read, and an
upload whose bytes do not hash to the key is never completed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import structlog

from mirror.coalesce import InFlight
from mirror.config import S3Config
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.storage.blobstore import AlreadyStored, BlobStore, StoreError, read_bytes
from mirror.upstream.retry import RetryPolicy

log = structlog.get_logger("mirror.uploads")


class ByteBudget:
    """At most `capacity` bytes held at once; a request above it waits for all of it."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._free = capacity
        self._changed = asyncio.Condition()

    async def take(self, amount: int) -> int:
        amount = min(amount, self._capacity)
        async with self._changed:
            await self._changed.wait_for(lambda: self._free >= amount)
            self._free -= amount
        return amount

    async def give(self, amount: int) -> None:
        async with self._changed:
            self._free += amount
            self._changed.notify_all()


class Uploader:
    def __init__(
        self,
        local: BlobStore,
        bucket: BlobStore,
        config: S3Config,
        retry: RetryPolicy,
        metrics: Metrics,
        stored: Callable[[Digest, int], None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._local = local
        self._bucket = bucket
        self._config = config
        self._retry = retry
        self._metrics = metrics
        self._stored = stored  # told of every blob (and its size) now known in the bucket
        self._sleep = sleep
        self._queue: asyncio.Queue[tuple[Digest, int]] = asyncio.Queue(config.upload_queue)
        self._waiting: set[str] = set()
        self._budget = ByteBudget(max(config.multipart_threshold, config.part_size))
        self._workers: InFlight[int, Uploader] = InFlight("upload worker")
        self._dropped = 0
        for result in ("queued", "done", "failed", "skipped", "dropped"):
            metrics.s3_uploads.labels(result)

    def start(self) -> None:
        for n in range(self._config.upload_concurrency):
            self._workers.start(n, self, self._work())

    def enqueue(self, digest: Digest, size: int) -> bool:
        """Queue a copy; False when it was dropped (already queued, or the queue is full)."""
        if digest.hex in self._waiting:
            return False
        try:
            self._queue.put_nowait((digest, size))
        except asyncio.QueueFull:
            self._dropped += 1
            self._metrics.s3_uploads.labels("dropped").inc()
            if self._dropped == 1 or self._dropped % 100 == 0:  # a full queue says so, not per blob
                log.warning("s3_upload_dropped", digest=str(digest), dropped=self._dropped)
            return False
        self._waiting.add(digest.hex)
        self._metrics.s3_uploads.labels("queued").inc()
        return True

    async def close(self) -> None:
        """In-flight uploads are abandoned (their multipart uploads aborted); the lifecycle
        rule sweeps whatever an abort could not."""
        await self._workers.close()

    async def _work(self) -> None:
        while True:
            digest, size = await self._queue.get()
            self._waiting.discard(digest.hex)
            try:
                result = await self._upload_with_retries(digest, size)
            except Exception:  # noqa: BLE001 - a bug in one upload must not stop the worker
                log.exception("s3_upload_bug", digest=str(digest))
                result = "failed"
            self._metrics.s3_uploads.labels(result).inc()

    async def _upload_with_retries(self, digest: Digest, size: int) -> str:
        failures = 0
        while True:
            try:
                return await self._upload(digest, size)
            except StoreError as exc:
                failures += 1
                if not self._retry.may_retry(failures):
                    log.warning("s3_upload_failed", digest=str(digest), error=str(exc))
                    return "failed"
                await self._sleep(self._retry.delay(failures))

    async def _upload(self, digest: Digest, size: int) -> str:
        held_there = await self._bucket.stat(digest)
        if held_there is not None:
            self._stored(digest, held_there)
            return "skipped"
        blob = await self._local.open(digest)
        if blob is None:
            return "skipped"  # evicted before its turn; its next fill queues it again
        writer = await self._bucket.create(size=blob.size, digest=digest)
        # One PUT holds the whole blob until it goes; parts go as they are read.
        whole = blob.size <= self._config.multipart_threshold
        held = await self._budget.take(blob.size) if whole else 0
        try:
            hashed = hashlib.sha256()
            # Read as the writer holds it: a single PUT in one buffer, else a part at a time.
            step = max(blob.size, 1) if whole else self._config.part_size
            for offset in range(0, blob.size, step):
                part = 0 if whole else await self._budget.take(min(step, blob.size - offset))
                try:
                    data = await read_bytes(blob, offset, min(offset + step, blob.size))
                    hashed.update(data)
                    await writer.write(offset, data)
                finally:
                    await self._budget.give(part)
            if hashed.hexdigest() != digest.hex:
                log.error("s3_upload_local_copy_corrupt", digest=str(digest))
                return "failed"
            await writer.commit(digest)
        except AlreadyStored:
            self._stored(digest, blob.size)
            return "skipped"  # another replica's copy won the conditional write
        finally:
            blob.close()
            await writer.discard()  # nothing once committed
            await self._budget.give(held)
        self._stored(digest, blob.size)
        log.info("s3_uploaded", digest=str(digest), bytes=blob.size)
        return "done"
