"""What a /v2/ request asks for, or the OCI error that answers it: one set of rules for the
manifest fast path and the handlers (pure)."""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import parse_qsl

from mirror.oci.digest import Digest, InvalidDigest, parse_digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.paths import Target, UnknownRegistry, route
from mirror.oci.reference import InvalidName, is_tag


def query_ns(raw_query: str) -> str | None:
    """containerd's `ns=<registry>`, percent-decoded once like any query value (its first one
    when repeated). The registry name itself is never decoded again."""
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        if key == "ns":
            return value
    return None


def target_of(
    name: str, ns: str | None, registries: Collection[str], default_registry: str
) -> Target:
    """The registry and repository a request names; only configured registries are reachable."""
    try:
        return route(name, ns, registries, default_registry)
    except UnknownRegistry as exc:
        raise RegistryError(
            ErrorCode.DENIED,
            f"registry {exc.registry!r} is not configured on this mirror",
            {"registry": exc.registry, "configured": sorted(registries)},
        ) from exc
    except InvalidName as exc:
        raise RegistryError(ErrorCode.NAME_INVALID, str(exc), {"name": name}) from exc


def manifest_reference(reference: str) -> Digest | None:
    """The digest of /v2/<name>/manifests/<reference>, or None when it is a tag.

    A reference that is neither is a manifest that cannot exist: 404 MANIFEST_UNKNOWN, as the
    distribution spec's conformance suite expects, not 400. A malformed digest is the client's
    error: 400 DIGEST_INVALID."""
    if ":" in reference:
        try:
            return parse_digest(reference)
        except InvalidDigest as exc:
            raise RegistryError(ErrorCode.DIGEST_INVALID, str(exc), {"digest": reference}) from exc
    if not is_tag(reference):
        raise RegistryError(
            ErrorCode.MANIFEST_UNKNOWN,
            f"invalid tag {reference!r}: no such manifest",
            {"tag": reference},
        )
    return None
