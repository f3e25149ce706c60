"""Upstream and storage failures translated into what the client is told."""

from __future__ import annotations

import math
from types import MappingProxyType

from mirror.cache.transfer import DigestMismatch, DownloadFailed
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.storage.blobstore import StoreError
from mirror.upstream.errors import (
    UpstreamBodyError,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnavailable,
)

# What the services expect to go wrong, and translate for the client. Anything else is a bug:
# it is left to reach the middleware, which logs its traceback once and answers 500 UNKNOWN.
# OSError covers the disk, timeouts and dropped connections.
EXPECTED: tuple[type[Exception], ...] = (
    RegistryError, UpstreamError, UpstreamUnavailable, UpstreamBodyError, UpstreamRefused,
    DownloadFailed, DigestMismatch, StoreError, OSError,
)  # fmt: skip

# An upstream's own answer about the request, passed on with the spec's status: the client's
# request is what is wrong, and asking elsewhere would not help. Never UNAUTHORIZED (a 401
# makes containerd send the node's credentials) nor TOOMANYREQUESTS (skopeo backs off ~30 s).
_PASSED_ON = MappingProxyType(
    {
        code.code: code
        for code in (
            ErrorCode.BLOB_UNKNOWN, ErrorCode.DIGEST_INVALID, ErrorCode.MANIFEST_UNKNOWN,
            ErrorCode.MANIFEST_INVALID, ErrorCode.NAME_INVALID, ErrorCode.NAME_UNKNOWN,
            ErrorCode.TAG_INVALID, ErrorCode.DENIED, ErrorCode.UNSUPPORTED,
            ErrorCode.RANGE_INVALID,
        )
    }
)  # fmt: skip


def to_registry_error(exc: BaseException, unknown: ErrorCode) -> RegistryError:
    """`unknown` is what a 404 means here (BLOB_UNKNOWN or MANIFEST_UNKNOWN).

    Never 401 (containerd would answer a challenge with the node's Docker Hub credentials) and
    never 429 (skopeo backs off ~30 s): "cannot serve now" (upstream 5xx, 429, timeouts,
    unreachable, breaker open) is a fast 503 UNAVAILABLE that every client falls back from.
    """
    if isinstance(exc, DownloadFailed):
        exc = exc.cause
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, DigestMismatch):
        return RegistryError(
            ErrorCode.UPSTREAM_ERROR, "upstream content did not match its digest",
            {"expected": str(exc.expected), "actual": f"sha256:{exc.actual}"},
        )  # fmt: skip
    if isinstance(exc, UpstreamError):
        return _answered(exc, unknown)
    if isinstance(exc, StoreError):
        return RegistryError(ErrorCode.UNAVAILABLE, f"cache storage failed: {exc}")
    if isinstance(exc, UpstreamUnavailable):
        return RegistryError(
            ErrorCode.UNAVAILABLE, str(exc), _origin(exc.registry),
            headers=_retry_after(exc.retry_after),
        )  # fmt: skip
    if isinstance(exc, UpstreamRefused):  # a redirect or realm it may not follow: 502
        name = exc.registry or "the upstream registry"
        return RegistryError(ErrorCode.UPSTREAM_ERROR, f"{name} {exc}", _origin(exc.registry))
    if isinstance(exc, UpstreamBodyError | ConnectionError):
        return RegistryError(ErrorCode.UNAVAILABLE, f"the upstream registry failed: {exc}")
    if isinstance(exc, TimeoutError):  # an OSError too: before the storage case below
        return RegistryError(ErrorCode.UNAVAILABLE, "the upstream registry did not answer in time")
    if isinstance(exc, OSError):
        return RegistryError(ErrorCode.UNAVAILABLE, f"cache storage failed: {exc.strerror}")
    return RegistryError(ErrorCode.UNKNOWN, f"{type(exc).__name__}")


def _answered(exc: UpstreamError, unknown: ErrorCode) -> RegistryError:
    """The origin answered with a status: what that status means for the client."""
    name = exc.registry or "the upstream registry"
    detail = {**_origin(exc.registry), "upstream_status": exc.status}
    if exc.status == 404:
        return RegistryError(unknown, detail={**detail, "upstream": exc.code or "NOT_FOUND"})
    if exc.status in (401, 403):
        return RegistryError(
            ErrorCode.DENIED, f"{name} refused the mirror's credentials", detail
        )  # fmt: skip
    if exc.status == 429:
        return RegistryError(
            ErrorCode.UNAVAILABLE, f"{name} is rate limiting the mirror", detail,
            headers=_retry_after(exc.retry_after),
        )  # fmt: skip
    detail["upstream_message"] = str(exc)
    if exc.status >= 500:
        return RegistryError(ErrorCode.UNAVAILABLE, f"{name} answered {exc.status}", detail)
    passed_on = _PASSED_ON.get(exc.code or "")
    if passed_on is not None:
        return RegistryError(passed_on, str(exc), detail)
    if exc.code:
        detail["upstream_code"] = exc.code
    return RegistryError(ErrorCode.UPSTREAM_ERROR, f"{name} answered {exc.status}", detail)


def _retry_after(wait: float | None) -> dict[str, str]:
    """When to ask again, in whole seconds, if there is a usable answer to that."""
    return {"Retry-After": str(math.ceil(wait))} if wait and math.isfinite(wait) else {}


def _origin(registry: str) -> dict[str, str]:
    return {"registry": registry} if registry else {}
