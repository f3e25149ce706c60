"""Manifests: immutable by digest; tags revalidated by HEAD after a TTL, served stale on outages."""

from __future__ import annotations

import errno
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from cachetools import LRUCache

from mirror.cache.errors import EXPECTED, to_registry_error
from mirror.cache.janitor import CacheJanitor
from mirror.cache.second import SecondLevel
from mirror.coalesce import SingleFlight
from mirror.config import CacheConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest, InvalidDigest, digest_of, parse_digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.mediatypes import INDEX_TYPES, MANIFEST_TYPES, SINGLE_IMAGE_TYPES, is_acceptable
from mirror.storage.metastore import ManifestStore, TagRecord, TagStore
from mirror.upstream.client import FetchedManifest, RegistryClient, TagList
from mirror.upstream.errors import UpstreamError, UpstreamUnavailable
from mirror.upstream.peer import Peers

log = structlog.get_logger("mirror.manifests")

_MEMORY_BYTES = 64 * 1024 * 1024
_MEMORY_TAGS = 100_000


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str  # "sha256:<hex>", always computed by us from the bytes


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    manifest: Manifest
    result: str  # hit | miss | coalesced | revalidated | stale


_TagKey = tuple[str, str, str]
_NarrowKey = tuple[_TagKey, frozenset[str]]


def _media_type(fetched: FetchedManifest) -> str:
    """The registry's Content-Type, unless it is generic; then the manifest's own mediaType."""
    if fetched.media_type in MANIFEST_TYPES or fetched.media_type.startswith("application/vnd."):
        return fetched.media_type
    try:
        declared = json.loads(fetched.body).get("mediaType")
    except (ValueError, AttributeError):
        declared = None
    return declared if isinstance(declared, str) and declared else fetched.media_type


class _LocalMeta(ManifestStore, TagStore, Protocol):
    pass


class ManifestService:
    def __init__(
        self,
        store: _LocalMeta,
        client: RegistryClient,
        config: CacheConfig,
        metrics: Metrics,
        janitor: CacheJanitor,
        clock: Callable[[], float],
        second: SecondLevel | None = None,
        peers: Peers | None = None,
    ) -> None:
        """`second`: the region's bucket, where manifests by digest are shared too; `peers`:
        the other replicas, whose owner of a digest is asked before either."""
        self._second = second
        self._peers = peers
        self._janitor = janitor
        self._store = store
        self._client = client
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._memory: LRUCache[str, Manifest] = LRUCache(
            _MEMORY_BYTES, getsizeof=lambda m: len(m.body) + 256
        )
        self._tags: LRUCache[_TagKey, TagRecord] = LRUCache(_MEMORY_TAGS)
        self._by_digest: SingleFlight[tuple[str, bool], Manifest] = SingleFlight("manifest")
        self._by_tag: SingleFlight[_TagKey, ManifestAnswer] = SingleFlight("tag")
        # What the origin answers a client that rejects the tag's index (a registry rewrites it
        # to one platform's manifest): remembered for the tag TTL, each a pull on Docker Hub.
        self._narrowed: LRUCache[_NarrowKey, TagRecord] = LRUCache(_MEMORY_TAGS // 10)
        self._by_narrow: SingleFlight[_NarrowKey, Manifest] = SingleFlight("narrowed tag")
        janitor.on_evicted(self._forget)

    # -- by digest ---------------------------------------------------------------------------

    async def local(self, digest: Digest) -> Manifest | None:
        found = self._memory.get(digest.hex)
        if found is None:
            stored = await self._store.read_manifest(digest)
            if stored is None:
                return None
            found = Manifest(stored[0], stored[1], str(digest))
            self._memory[digest.hex] = found
        self._janitor.accessed(digest)
        return found

    def _forget(self, digest: Digest) -> None:
        """Its file was evicted: a copy kept here would be served without ever being stored
        again, so the next request fetches it and writes it back."""
        self._memory.pop(digest.hex, None)

    async def by_digest(
        self,
        registry: str,
        name: str,
        digest: Digest,
        accepted: frozenset[str] = frozenset(),
        for_peer: bool = False,
    ) -> ManifestAnswer:
        """`for_peer`: asked by another replica. Served from this one's own levels, and never
        by joining a fetch of its own, which may itself be asking that peer."""
        found = await self.local(digest)
        if found is not None:
            answer = ManifestAnswer(found, "hit")
        else:
            try:
                manifest, shared = await self._fetch_shared(registry, name, digest, for_peer)
            except EXPECTED as exc:  # translated for the client; anything else is a bug
                raise to_registry_error(exc, ErrorCode.MANIFEST_UNKNOWN) from exc
            answer = ManifestAnswer(manifest, "coalesced" if shared else "miss")
        if not is_acceptable(answer.manifest.media_type, accepted):
            raise _not_acceptable(f"manifest {digest}", answer.manifest, accepted)  # fixed
        return answer

    def _fetch_shared(
        self, registry: str, name: str, digest: Digest, for_peer: bool = False
    ) -> Awaitable[tuple[Manifest, bool]]:
        """One upstream GET per digest however many ask at once (by digest or revalidating)."""
        return self._by_digest.do(
            (digest.hex, for_peer), lambda: self._fetch_by_digest(registry, name, digest, for_peer)
        )

    async def _fetch_by_digest(
        self, registry: str, name: str, digest: Digest, for_peer: bool = False
    ) -> Manifest:
        if self._peers is not None and not for_peer:
            owned = await self._peers.manifest(registry, name, digest)
            if owned is not None and digest_of(owned[0]) == digest:
                return await self._keep(digest, owned[0], owned[1], share=False)
        if self._second is not None:
            shared = await self._second.read_manifest(digest)
            if shared is not None and digest_of(shared[0]) == digest:
                return await self._keep(digest, shared[0], shared[1], share=False)
            if shared is not None:
                self._second.condemn(digest)  # never served: fetched from the origin instead
        fetched = await self._client.get_manifest(registry, name, str(digest))
        actual = digest_of(fetched.body)
        if actual != digest:
            self._metrics.digest_mismatches.labels(registry).inc()
            raise RegistryError(
                ErrorCode.UPSTREAM_ERROR, "upstream manifest did not match its digest",
                {"expected": str(digest), "actual": str(actual)},
            )  # fmt: skip
        return await self._keep(digest, fetched.body, _media_type(fetched))

    async def _keep(
        self, digest: Digest, body: bytes, media_type: str, share: bool = True
    ) -> Manifest:
        manifest = Manifest(body, media_type, str(digest))
        self._memory[digest.hex] = manifest
        if share and self._second is not None:
            self._second.keep_manifest(digest, body, media_type)  # in the background
        try:
            await self._store.write_manifest(digest, body, media_type)
        except OSError as exc:
            self._write_failed(exc)  # served from memory all the same
        else:
            self._janitor.stored(digest, len(body))
        return manifest

    # -- from memory only (the fast path: no I/O, no await) -----------------------------------

    def peek_digest(self, digest: Digest, accepted: frozenset[str]) -> Manifest | None:
        found = self._memory.get(digest.hex)
        if found is None or not is_acceptable(found.media_type, accepted):
            return None
        self._janitor.accessed(digest)
        return found

    def peek_tag(
        self, registry: str, name: str, tag: str, accepted: frozenset[str]
    ) -> Manifest | None:
        """A tag's manifest when the by_tag path would answer it as a hit, else None."""
        record = self._tags.get((registry, name, tag))
        if record is None or not self._fresh(record):
            return None
        return self.peek_digest(parse_digest(record.digest), accepted)

    # -- by tag ------------------------------------------------------------------------------

    async def by_tag(
        self, registry: str, name: str, tag: str, accepted: frozenset[str]
    ) -> ManifestAnswer:
        key = (registry, name, tag)
        record = await self._record(key)
        if record is not None and self._fresh(record):
            found = await self.local(parse_digest(record.digest))
            if found is not None:
                return await self._acceptable(key, ManifestAnswer(found, "hit"), accepted)
        answer, shared = await self._by_tag.do(key, lambda: self._resolve(key, record))
        if shared and answer.result == "miss":
            answer = ManifestAnswer(answer.manifest, "coalesced")
        return await self._acceptable(key, answer, accepted)

    async def _acceptable(
        self, key: _TagKey, answer: ManifestAnswer, accepted: frozenset[str]
    ) -> ManifestAnswer:
        """The tag's manifest, unless the client does not accept its type.

        The mirror fetched it with every manifest type in its Accept, so for an image manifest
        the origin's answer is already known. An index is different: a registry answers a
        client that rejects it with one platform's manifest instead (old Docker clients rely on
        it). That answer, or the lack of one, is asked for once per tag and set of image types
        the client takes, and kept for the tag TTL: every question is a pull on Docker Hub, and
        an Accept header is the client's to vary."""
        manifest = answer.manifest
        if is_acceptable(manifest.media_type, accepted):
            return answer
        wanted = accepted & SINGLE_IMAGE_TYPES
        if manifest.media_type not in INDEX_TYPES or not wanted:
            raise _not_acceptable(f"tag {key[2]}", manifest, accepted)
        narrow = (key, wanted)
        record = self._narrowed.get(narrow)
        if record is not None and self._fresh(record):
            if not record.digest:  # the origin had nothing of these types either
                raise _not_acceptable(f"tag {key[2]}", manifest, accepted)
            found = await self.local(parse_digest(record.digest))
            if found is not None:
                return ManifestAnswer(found, "hit")
        try:
            found, shared = await self._by_narrow.do(narrow, lambda: self._get_narrow(narrow))
        except RegistryError:
            raise
        except EXPECTED as exc:  # stale, refused, or translated for the client
            if isinstance(exc, UpstreamError) and exc.status == 404:
                self._narrowed[narrow] = _nothing(self._clock())
                raise _not_acceptable(f"tag {key[2]}", manifest, accepted) from exc
            if _unavailable(exc):
                return await self._stale_or_raise(key, record, exc)
            raise to_registry_error(exc, ErrorCode.MANIFEST_UNKNOWN) from exc
        return ManifestAnswer(found, "coalesced" if shared else "miss")

    async def _get_narrow(self, narrow: _NarrowKey) -> Manifest:
        (registry, name, tag), wanted = narrow
        fetched = await self._client.get_manifest(
            registry, name, tag, accept=", ".join(sorted(wanted))
        )
        found = await self._keep_fetched(registry, fetched)
        if not is_acceptable(found.media_type, wanted):  # the origin ignored the Accept header
            self._narrowed[narrow] = _nothing(self._clock())
            raise _not_acceptable(f"tag {tag}", found, wanted)
        self._narrowed[narrow] = TagRecord(
            found.digest, found.media_type, len(found.body), self._clock()
        )
        return found

    def _fresh(self, record: TagRecord) -> bool:
        """Served without asking upstream: the one place the tag TTL is applied."""
        return self._clock() - record.fetched_at < self._config.tag_ttl

    async def _record(self, key: _TagKey) -> TagRecord | None:
        record = self._tags.get(key)
        if record is None:
            record = await self._store.read_tag(*key)
            if record is not None:
                self._tags[key] = record
        return record

    async def _resolve(self, key: _TagKey, record: TagRecord | None) -> ManifestAnswer:
        registry, name, tag = key
        try:
            if record is None and self._peers is None and self._second is None:
                return ManifestAnswer(await self._get_tag(key), "miss")
            if record is None:
                return await self._first_in_region(key)
            return await self._revalidate(key, record)
        except RegistryError:
            raise
        except EXPECTED as exc:  # stale, or translated for the client
            if _unavailable(exc):
                return await self._stale_or_raise(key, record, exc)
            raise to_registry_error(exc, ErrorCode.MANIFEST_UNKNOWN) from exc

    async def _first_in_region(self, key: _TagKey) -> ManifestAnswer:
        """A tag this replica has never seen, where the region may hold its manifest: the
        digest from a HEAD (free), the manifest by digest from the owner or the bucket, and
        the origin asked for it only if neither has it."""
        head = await self._client.head_manifest(*key)
        return ManifestAnswer(await self._named_by(key, head.digest), "miss")

    async def _revalidate(self, key: _TagKey, record: TagRecord) -> ManifestAnswer:
        """HEAD is free on Docker Hub; a GET counts as a pull, so GET only unknown digests."""
        registry, name, tag = key
        head = await self._client.head_manifest(
            registry, name, tag, retry=False, attempt_timeout=self._config.revalidate_timeout
        )
        found = await self._named_by(key, head.digest)
        return ManifestAnswer(found, "revalidated" if head.digest == record.digest else "miss")

    async def _named_by(self, key: _TagKey, named: str | None) -> Manifest:
        """The manifest a tag HEAD named, by digest (from here, the region, or the origin),
        recorded as the tag's; fetched by tag when the HEAD named no usable digest."""
        try:
            digest = parse_digest(named or "")
        except InvalidDigest:
            return await self._get_tag(key)
        found = await self.local(digest)
        if found is None:
            found, _ = await self._fetch_shared(key[0], key[1], digest)
        await self._save_tag(key, found)
        return found

    async def _get_tag(self, key: _TagKey) -> Manifest:
        registry, name, tag = key
        manifest = await self._keep_fetched(
            registry, await self._client.get_manifest(registry, name, tag)
        )
        await self._save_tag(key, manifest)
        return manifest

    async def _keep_fetched(self, registry: str, fetched: FetchedManifest) -> Manifest:
        """A manifest fetched by tag: checked against the digest the registry named, kept."""
        digest = digest_of(fetched.body)
        if (
            fetched.digest
            and fetched.digest.startswith("sha256:")
            and fetched.digest != str(digest)
        ):
            self._metrics.digest_mismatches.labels(registry).inc()
            raise RegistryError(
                ErrorCode.UPSTREAM_ERROR, "upstream manifest did not match its digest header",
                {"expected": fetched.digest, "actual": str(digest)},
            )  # fmt: skip
        return await self._keep(digest, fetched.body, _media_type(fetched))

    async def _save_tag(self, key: _TagKey, manifest: Manifest) -> None:
        record = TagRecord(manifest.digest, manifest.media_type, len(manifest.body), self._clock())
        self._tags[key] = record
        try:
            await self._store.write_tag(*key, record)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        """The disk is full (or failing): the answer lives in memory until it can be written."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise exc
        self._metrics.cache_write_failures.labels("enospc").inc()
        log.warning("manifest_not_cached", error=exc.strerror)

    async def _stale_or_raise(
        self, key: _TagKey, record: TagRecord | None, exc: BaseException
    ) -> ManifestAnswer:
        """The last answer while the origin cannot give one (bounded by max_stale), or the
        failure. A remembered "nothing" (a narrowed Accept's) has nothing to serve."""
        registry = key[0]
        if (
            record is not None
            and record.digest
            and self._clock() - record.fetched_at <= self._config.max_stale
        ):
            found = await self.local(parse_digest(record.digest))
            if found is not None:
                self._metrics.stale_served.labels(registry).inc()
                log.warning(
                    "stale_served", registry=registry, name=key[1], tag=key[2],
                    age=round(self._clock() - record.fetched_at), reason=type(exc).__name__,
                )  # fmt: skip
                return ManifestAnswer(found, "stale")
        raise to_registry_error(exc, ErrorCode.MANIFEST_UNKNOWN) from exc

    async def tags(self, registry: str, name: str, query: dict[str, str]) -> TagList:
        try:
            return await self._client.list_tags(registry, name, query)
        except EXPECTED as exc:  # translated for the client; anything else is a bug
            raise to_registry_error(exc, ErrorCode.NAME_UNKNOWN) from exc

    async def close(self) -> None:
        await self._by_digest.close()
        await self._by_tag.close()
        await self._by_narrow.close()


def _not_acceptable(reference: str, manifest: Manifest, accepted: frozenset[str]) -> RegistryError:
    return RegistryError(
        ErrorCode.MANIFEST_UNKNOWN,
        f"{reference} has media type {manifest.media_type}; the Accept header lists only "
        f"{', '.join(sorted(accepted))}",
        {"media_type": manifest.media_type, "accepted": sorted(accepted)},
    )


def _nothing(when: float) -> TagRecord:
    """A remembered "the origin has nothing of these types for this tag"."""
    return TagRecord("", "", 0, when)


def _unavailable(exc: BaseException) -> bool:
    """The origin could not answer now (as opposed to answering no)."""
    if isinstance(exc, UpstreamError):
        return exc.transient
    return isinstance(exc, UpstreamUnavailable | TimeoutError)
