"""The one table of OCI error codes and the exception that carries them to the renderer."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any


class ErrorCode(Enum):
    """(spec code, HTTP status, default message) for every error the mirror answers with."""

    BLOB_UNKNOWN = ("BLOB_UNKNOWN", 404, "blob unknown to registry")
    DIGEST_INVALID = ("DIGEST_INVALID", 400, "provided digest did not match uploaded content")
    MANIFEST_UNKNOWN = ("MANIFEST_UNKNOWN", 404, "manifest unknown")
    MANIFEST_INVALID = ("MANIFEST_INVALID", 400, "manifest invalid")
    NAME_INVALID = ("NAME_INVALID", 400, "invalid repository name")
    NAME_UNKNOWN = ("NAME_UNKNOWN", 404, "repository name not known to registry")
    TAG_INVALID = ("TAG_INVALID", 400, "invalid tag")
    NOT_FOUND = ("NOT_FOUND", 404, "no such endpoint")
    UNAUTHORIZED = ("UNAUTHORIZED", 401, "authentication required")
    DENIED = ("DENIED", 403, "requested access to the resource is denied")
    UNSUPPORTED = ("UNSUPPORTED", 405, "the operation is unsupported")
    RANGE_INVALID = ("RANGE_INVALID", 416, "requested range not satisfiable")
    TOOMANYREQUESTS = ("TOOMANYREQUESTS", 429, "too many requests")
    UPSTREAM_ERROR = ("UNKNOWN", 502, "upstream registry answered with an error")
    UNAVAILABLE = ("UNAVAILABLE", 503, "upstream registry unavailable")
    UNKNOWN = ("UNKNOWN", 500, "internal error")
    # Not a distribution-spec code: the mirror's own admin API answers malformed requests so.
    BAD_REQUEST = ("BAD_REQUEST", 400, "the request is not valid")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]

    @property
    def message(self) -> str:
        return self.value[2]


class RegistryError(Exception):
    """An error for the client: rendered once, by the middleware, as the OCI JSON envelope."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.message
        self.detail = detail
        self.status = status or code.status
        self.headers = headers or {}
        super().__init__(f"{code.code}: {self.message}")


def error_body(code: ErrorCode, message: str, detail: Any = None) -> bytes:
    """The spec's envelope: {"errors": [{"code", "message", "detail"}]}."""
    entry: dict[str, Any] = {"code": code.code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()
