"""Upstream and storage failures translated into what the client is told."""

from __future__ import annotations

from mirror.cache.transfer import DigestMismatch, DownloadFailed
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.storage.store import StoreError
from mirror.upstream.errors import UpstreamError, UpstreamUnavailable


def to_registry_error(exc: BaseException, unknown: ErrorCode) -> RegistryError:
    """`unknown` is what a 404 means here (BLOB_UNKNOWN or MANIFEST_UNKNOWN).

    Never 401 (containerd would answer a challenge with the node's Docker Hub credentials) and
    never 429 (skopeo backs off ~30 s): "cannot serve now" is a fast 503 that every client
    falls back from.
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
        if exc.status == 404:
            return RegistryError(unknown, detail={"upstream": exc.code or "NOT_FOUND"})
        if exc.status in (401, 403):
            return RegistryError(
                ErrorCode.DENIED, "the upstream registry refused the mirror's credentials",
                {"upstream_status": exc.status},
            )  # fmt: skip
        if exc.status == 429:
            headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else {}
            return RegistryError(
                ErrorCode.UNAVAILABLE, "the upstream registry is rate limiting the mirror",
                {"upstream_status": 429}, headers=headers,
            )  # fmt: skip
        return RegistryError(
            ErrorCode.UPSTREAM_ERROR, f"upstream registry answered {exc.status}",
            {"upstream_status": exc.status, "upstream_message": str(exc)},
        )  # fmt: skip
    if isinstance(exc, StoreError):
        return RegistryError(ErrorCode.UNAVAILABLE, f"cache storage failed: {exc}")
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        return RegistryError(ErrorCode.UNAVAILABLE, f"cache storage failed: {exc.strerror}")
    if isinstance(exc, TimeoutError):
        return RegistryError(ErrorCode.UNAVAILABLE, "the upstream registry did not answer in time")
    if isinstance(exc, UpstreamUnavailable):
        return RegistryError(ErrorCode.UNAVAILABLE, str(exc))
    return RegistryError(ErrorCode.UNKNOWN, f"{type(exc).__name__}")
