"""Cache warming: jobs that pull images into the cache ahead of demand, on the live pull path.

A job is a list of image references and platforms. Each image is resolved through the
ManifestService (tag or digest; an index is expanded to the requested platforms only) and its
config and layers go through BlobService.fetch: the very download a live pull would start or
join, so a warm and a pull of one blob share one upstream fetch, and a cached blob costs
nothing. Jobs run as tasks owned by this service, never by the request that submitted them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import structlog

from mirror.cache.blobs import BlobService
from mirror.cache.manifests import ManifestService
from mirror.cache.warm_jobs import (
    DONE,
    FAILED,
    FETCHING,
    QUEUED,
    RESOLVING,
    RUNNING,
    ImageStatus,
    Job,
)
from mirror.config import WarmConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.manifest import (
    Descriptor,
    InvalidManifest,
    choose_platform,
    parse_manifest,
    same_platform,
)
from mirror.oci.reference import ImageReference, InvalidReference, parse_image_reference

log = structlog.get_logger("mirror.warming")

MAX_IMAGES = 500
MAX_PLATFORMS = 16
KEEP_JOBS = 100  # finished jobs are forgotten oldest first beyond this; running ones never
MAX_ACTIVE_JOBS = 16  # jobs not finished yet; one more is refused until one finishes
MAX_QUEUED_IMAGES = 2000  # images of all jobs not finished yet, a new job's included
# A job whose images fail to resolve this many times in a row stops trying the rest: a list of
# missing tags must not become as many upstream manifest requests (Docker Hub pulls).
MAX_FAILED_IN_A_ROW = 20
BLOBS_PER_IMAGE = 4  # each blob download may itself open several ranged streams
_PLATFORM = re.compile(r"[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)?")
# Foreign (Windows base) layers are not served by registries: clients fetch them from their
# `urls`, so there is nothing to warm.
_NOT_DISTRIBUTED = ("foreign", "nondistributable")
_MAX_LISTED = 20


class InvalidWarmRequest(ValueError):
    """The images or platforms of a request cannot be warmed; `problems` names each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:_MAX_LISTED]
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__("; ".join(shown) + more)


class WarmBusy(Exception):
    """Too many jobs still running to accept another."""


class _Failed(Exception):
    """An image cannot be warmed; the message is its reason, `cause` the manifest request's
    answer when resolving it failed."""

    def __init__(self, reason: str, cause: RegistryError | None = None) -> None:
        super().__init__(reason)
        self.cause = cause


@dataclass
class _Brake:
    """What a job stops asking upstream for: the rest of a registry's images once it could not
    serve one (rate limit, outage, open breaker: the next would fare no better), and all the
    rest once `limit` images in a row failed to resolve."""

    limit: int
    in_a_row: int = 0
    skipped: int = 0  # images failed without a request, for those reasons
    stopped: dict[str | None, str] = field(default_factory=dict)  # registry (None: all) -> why

    def why_not(self, registry: str) -> str | None:
        return self.stopped.get(registry) or self.stopped.get(None)

    def resolved(self) -> None:
        self.in_a_row = 0

    def failed(self, image: ImageStatus, cause: RegistryError) -> None:
        ref = image.reference
        if cause.code is ErrorCode.UNAVAILABLE:
            self.stopped.setdefault(
                ref.registry,
                f"not tried: {ref.registry} could not serve {ref.name}:{ref.reference} "
                f"({cause.message}); submit it again later",
            )
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            self.stopped.setdefault(
                None,
                f"not tried: {self.limit} images in a row failed to resolve before it; "
                "check the list and submit again",
            )


class WarmService:
    def __init__(
        self,
        manifests: ManifestService,
        blobs: BlobService,
        config: WarmConfig,
        metrics: Metrics,
        default_registry: str,
        registries: Collection[str],
        clock: Callable[[], float],
        blobs_per_image: int = BLOBS_PER_IMAGE,
        *,
        max_active_jobs: int = MAX_ACTIVE_JOBS,
        max_queued_images: int = MAX_QUEUED_IMAGES,
        max_failed_in_a_row: int = MAX_FAILED_IN_A_ROW,
    ) -> None:
        self._manifests = manifests
        self._blobs = blobs
        self._config = config
        self._metrics = metrics
        self._default_registry = default_registry
        self._registries = registries
        self._clock = clock
        self._blobs_per_image = blobs_per_image
        self._max_active_jobs = max_active_jobs
        self._max_queued_images = max_queued_images
        self._max_failed_in_a_row = max_failed_in_a_row
        # Shared by all jobs: two jobs together warm no more images at once than one.
        self._slots = asyncio.Semaphore(config.concurrency)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        for state in (QUEUED, DONE, FAILED):  # every series from the first scrape
            metrics.warm_jobs.labels(state)

    # -- the API -----------------------------------------------------------------------------

    def submit(self, images: Sequence[str], platforms: Sequence[str] | None) -> Job:
        """Validate everything first (InvalidWarmRequest lists every problem), then start."""
        references = self._references(images)
        wanted = self._platforms(platforms)
        self._admit(len(references))
        self._make_room()
        job = Job(
            secrets.token_hex(8),
            [ImageStatus(text, ref) for text, ref in references],
            wanted,
            self._clock(),
        )
        self._jobs[job.id] = job
        self._metrics.warm_jobs.labels(QUEUED).inc()
        # A fresh context: the job outlives the request that submitted it.
        task = asyncio.create_task(
            self._run(job), name=f"warm {job.id}", context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("warm_job_submitted", job=job.id, images=len(job.images), platforms=wanted)
        return job

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None:
            self._refresh(job)
        return job

    def list(self) -> builtins.list[Job]:
        """Recent jobs, newest first."""
        jobs = list(reversed(self._jobs.values()))
        for job in jobs:
            self._refresh(job)
        return jobs

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- validation --------------------------------------------------------------------------

    def _references(self, images: Sequence[str]) -> builtins.list[tuple[str, ImageReference]]:
        if not images:
            raise InvalidWarmRequest(["images: the list is empty"])
        if len(images) > MAX_IMAGES:
            raise InvalidWarmRequest([f"images: {len(images)} given, at most {MAX_IMAGES} per job"])
        problems: builtins.list[str] = []
        seen: dict[str, tuple[str, ImageReference]] = {}
        for i, text in enumerate(images):
            if not isinstance(text, str):
                problems.append(f"images[{i}]: not a string")
                continue
            try:
                ref = parse_image_reference(text, self._default_registry)
            except InvalidReference as exc:
                problems.append(f"images[{i}]: {exc}")
                continue
            if ref.registry not in self._registries:
                problems.append(
                    f"images[{i}]: {text!r}: registry {ref.registry!r} is not configured "
                    f"on this mirror (configured: {', '.join(sorted(self._registries))})"
                )
                continue
            seen.setdefault(str(ref), (text.strip(), ref))  # the same image twice: once
        if problems:
            raise InvalidWarmRequest(problems)
        return list(seen.values())

    def _platforms(self, platforms: Sequence[str] | None) -> tuple[str, ...]:
        if platforms is None:
            return self._config.platforms
        if not platforms:
            raise InvalidWarmRequest(["platforms: the list is empty (omit it for the default)"])
        if len(platforms) > MAX_PLATFORMS:
            raise InvalidWarmRequest([f"platforms: at most {MAX_PLATFORMS}"])
        problems: builtins.list[str] = []
        wanted: builtins.list[str] = []
        for i, p in enumerate(platforms):
            text = p.strip().lower() if isinstance(p, str) else ""
            if not _PLATFORM.fullmatch(text):
                problems.append(f"platforms[{i}]: {p!r} is not os/arch[/variant]")
            elif text not in wanted:
                wanted.append(text)
        if problems:
            raise InvalidWarmRequest(problems)
        return tuple(wanted)

    def _admit(self, images: int) -> None:
        """Bounded work, whoever asks: jobs not finished, and the images they have left."""
        active = [j for j in self._jobs.values() if j.finished is None]
        if len(active) >= self._max_active_jobs:
            raise WarmBusy(
                f"{len(active)} warm jobs are not finished (at most {self._max_active_jobs}); "
                "submit when some finish"
            )
        left = sum(i.state not in (DONE, FAILED) for j in active for i in j.images)
        if left + images > self._max_queued_images:
            raise WarmBusy(
                f"{left} images of earlier jobs are still to be warmed; with this job's {images} "
                f"that is over {self._max_queued_images}: submit when some finish"
            )

    def _make_room(self) -> None:
        """Forget the oldest finished jobs beyond KEEP_JOBS (unfinished ones are fewer)."""
        for job_id in [j.id for j in self._jobs.values() if j.finished is not None]:
            if len(self._jobs) < KEEP_JOBS:
                break
            del self._jobs[job_id]

    # -- running a job -----------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        structlog.contextvars.bind_contextvars(warm_job=job.id)
        job.state = RUNNING
        job.started = self._clock()
        brake = _Brake(self._max_failed_in_a_row)
        try:
            await asyncio.gather(*(self._warm(job, image, brake) for image in job.images))
        finally:
            job.finished = self._clock()
            job.state = FAILED if any(i.state != DONE for i in job.images) else DONE
            self._metrics.warm_jobs.labels(job.state).inc()
            log.info(
                "warm_job_finished", job=job.id, state=job.state,
                images=len(job.images), failed=sum(i.state == FAILED for i in job.images),
                not_tried=brake.skipped, bytes=job.distinct_blobs()["bytes_done"],
                seconds=round(job.finished - job.started, 3),
            )  # fmt: skip

    async def _warm(self, job: Job, image: ImageStatus, brake: _Brake) -> None:
        try:
            async with self._slots:
                why_not = brake.why_not(image.reference.registry)
                if why_not is not None:
                    brake.skipped += 1
                    self._fail(image, why_not, quiet=True)  # counted in the job's last line
                    return
                image.state = RESOLVING
                image.started = self._clock()
                try:
                    descriptors = await self._resolve(image, job.platforms)
                except _Failed as exc:
                    if exc.cause is not None:
                        brake.failed(image, exc.cause)
                    raise
                brake.resolved()
                image.state = FETCHING
                await self._fetch_blobs(image, descriptors)
        except asyncio.CancelledError:
            self._fail(image, "cancelled: the mirror is shutting down")
            raise
        except _Failed as exc:
            self._fail(image, str(exc))
        except Exception as exc:  # noqa: BLE001 - one image's bug must not end the job
            log.exception("warm_image_error", image=str(image.reference))
            self._fail(image, f"internal error: {type(exc).__name__}")
        else:
            image.state = DONE
            image.finished = self._clock()

    def _fail(self, image: ImageStatus, reason: str, quiet: bool = False) -> None:
        image.state = FAILED
        image.reason = reason
        image.finished = self._clock()
        # What unfinished downloads had written no longer counts: only whole blobs do.
        image.blob_bytes = {b: n for b, n in image.blob_bytes.items() if b in image.blobs_fetched}
        image.in_flight.clear()
        if not quiet:
            log.warning("warm_image_failed", image=str(image.reference), reason=reason)

    async def _resolve(
        self, image: ImageStatus, platforms: tuple[str, ...]
    ) -> builtins.list[Descriptor]:
        """The blobs of the image: an index contributes only its entries for `platforms`."""
        ref = image.reference
        try:
            if ref.digest is not None:
                answer = await self._manifests.by_digest(ref.registry, ref.name, ref.digest)
            else:
                tag = ref.tag or "latest"
                answer = await self._manifests.by_tag(ref.registry, ref.name, tag, frozenset())
            parsed = parse_manifest(answer.manifest.body, answer.manifest.media_type)
        except RegistryError as exc:
            raise _Failed(f"manifest {ref.reference}: {exc}", exc) from exc
        except InvalidManifest as exc:
            raise _Failed(f"manifest {ref.reference}: {exc}") from exc
        image.digest = answer.manifest.digest
        if not parsed.is_index:
            # As in a pull: a single image manifest is what every node gets, whatever its
            # platform (containerd checks no platform for the manifest a tag names).
            return list(parsed.children)
        offered = [e.platform for e in parsed.children]
        # unknown/unknown entries are attestations (buildx), not something a node runs
        has = ", ".join(sorted({p for p in offered if p and not p.startswith("unknown/")}))
        has = has or "none"
        chosen: dict[str, Descriptor] = {}
        for wanted in platforms:
            position = choose_platform(wanted, offered)
            if position is None:
                image.missing_platforms.append(wanted)
                continue
            entry = parsed.children[position]
            chosen.setdefault(entry.digest.hex, entry)
            if not same_platform(wanted, entry.platform or ""):
                image.notes.append(
                    f"{wanted}: not in the index; warmed {entry.platform}, "
                    f"which a {wanted} node pulls instead"
                )
        if not chosen:
            raise _Failed(f"the index has no manifest for {', '.join(platforms)} (it has: {has})")
        if image.missing_platforms:
            image.notes.insert(
                0, f"not in the index: {', '.join(image.missing_platforms)} (it has: {has})"
            )
        image.platforms = [e.platform or "" for e in chosen.values()]
        children = await asyncio.gather(
            *(self._child(ref, entry.digest) for entry in chosen.values())
        )
        return [blob for child in children for blob in child]

    async def _child(self, ref: ImageReference, digest: Digest) -> tuple[Descriptor, ...]:
        try:
            answer = await self._manifests.by_digest(ref.registry, ref.name, digest)
            parsed = parse_manifest(answer.manifest.body, answer.manifest.media_type)
        except RegistryError as exc:
            raise _Failed(f"manifest {digest}: {exc}", exc) from exc
        except InvalidManifest as exc:
            raise _Failed(f"manifest {digest}: {exc}") from exc
        if parsed.is_index:
            raise _Failed(f"manifest {digest}: an index inside an index is not supported")
        return parsed.children

    async def _fetch_blobs(
        self, image: ImageStatus, descriptors: builtins.list[Descriptor]
    ) -> None:
        unique: dict[str, Descriptor] = {}
        for d in descriptors:
            if not any(word in d.media_type for word in _NOT_DISTRIBUTED):
                unique.setdefault(d.digest.hex, d)
        image.blob_sizes = {blob: max(d.size, 0) for blob, d in unique.items()}
        limit = asyncio.Semaphore(self._blobs_per_image)
        tasks = [asyncio.create_task(self._fetch_blob(image, d, limit)) for d in unique.values()]
        try:
            await asyncio.gather(*tasks)
        finally:  # the first failure ends the image; the shared downloads themselves go on
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_blob(
        self, image: ImageStatus, blob: Descriptor, limit: asyncio.Semaphore
    ) -> None:
        ref = image.reference
        async with limit:
            image.in_flight[blob.digest.hex] = blob
            try:
                result = await self._blobs.fetch(ref.registry, ref.name, blob.digest)
            except RegistryError as exc:
                raise _Failed(f"blob {blob.digest}: {exc}") from exc
            finally:
                image.in_flight.pop(blob.digest.hex, None)
        size = blob.size
        if size < 0:  # schema 1 manifests carry no sizes: learn it from the cache
            size = await self._blobs.cached_size(blob.digest) or 0
        image.blob_sizes[blob.digest.hex] = size
        image.blob_bytes[blob.digest.hex] = size
        image.blobs_fetched.add(blob.digest.hex)
        if result == "hit":
            image.blobs_cached += 1

    def _refresh(self, job: Job) -> None:
        """Live byte counts: finished blobs plus what the downloads in flight have written."""
        for image in job.images:
            if image.state != FETCHING:
                continue
            for blob in list(image.in_flight.values()):
                progress = self._blobs.progress(blob.digest)
                if progress is not None and blob.digest.hex not in image.blobs_fetched:
                    written = progress[0]
                    image.blob_bytes[blob.digest.hex] = (
                        min(written, blob.size) if blob.size >= 0 else written
                    )
