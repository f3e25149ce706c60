"""The headers both request paths send, and the request id: one definition for each."""

from __future__ import annotations

import itertools
import re
import secrets

# Every answer names the API it speaks (skopeo's ping checks it) and the server, as "mirror"
# rather than a framework and its version: a scanner learns nothing it could look up.
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
SERVER = ("Server", "mirror")
REQUEST_ID = "X-Request-ID"

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def manifest_headers(media_type: str, digest: str) -> dict[str, str]:
    """What a manifest answer (GET or HEAD) carries besides its length: containerd's tag HEAD
    needs the digest, the length and the exact type, or it repeats the request as a GET."""
    return {"Content-Type": media_type, "Docker-Content-Digest": digest, "ETag": f'"{digest}"'}


class RequestIds:
    """The id of each request: the client's own when it is a sane token (a node-local mirror
    or a proxy in front passes its id on, so one pull can be followed through every tier),
    otherwise a new one, unique per process start and request without a system call each."""

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = prefix if prefix is not None else secrets.token_hex(4)
        self._count = itertools.count(1)

    def __call__(self, supplied: str | None) -> str:
        if supplied and _VALID_REQUEST_ID.fullmatch(supplied):
            return supplied
        return f"{self._prefix}{next(self._count):08x}"
