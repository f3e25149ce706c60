"""The OCI error table, its JSON envelope, and the one renderer in the middleware."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mirror.middleware import render_error
from mirror.oci.errors import ErrorCode, RegistryError, error_body

# Spec codes and statuses clients act on (containerd, docker and skopeo read "code").
SPEC = [
    (ErrorCode.BLOB_UNKNOWN, "BLOB_UNKNOWN", 404),
    (ErrorCode.DIGEST_INVALID, "DIGEST_INVALID", 400),
    (ErrorCode.MANIFEST_UNKNOWN, "MANIFEST_UNKNOWN", 404),
    (ErrorCode.MANIFEST_INVALID, "MANIFEST_INVALID", 400),
    (ErrorCode.NAME_INVALID, "NAME_INVALID", 400),
    (ErrorCode.NAME_UNKNOWN, "NAME_UNKNOWN", 404),
    (ErrorCode.TAG_INVALID, "TAG_INVALID", 400),
    (ErrorCode.NOT_FOUND, "NOT_FOUND", 404),
    (ErrorCode.UNAUTHORIZED, "UNAUTHORIZED", 401),
    (ErrorCode.DENIED, "DENIED", 403),
    (ErrorCode.UNSUPPORTED, "UNSUPPORTED", 405),
    (ErrorCode.RANGE_INVALID, "RANGE_INVALID", 416),
    (ErrorCode.TOOMANYREQUESTS, "TOOMANYREQUESTS", 429),
    (ErrorCode.UPSTREAM_ERROR, "UNKNOWN", 502),
    (ErrorCode.UNAVAILABLE, "UNAVAILABLE", 503),
    (ErrorCode.UNKNOWN, "UNKNOWN", 500),
]


@pytest.mark.parametrize(("member", "code", "status"), SPEC)
def test_error_table(member: ErrorCode, code: str, status: int) -> None:
    assert (member.code, member.status) == (code, status)


@pytest.mark.parametrize("member", list(ErrorCode))
def test_every_member_is_an_error_status_with_a_code_and_message(member: ErrorCode) -> None:
    assert 400 <= member.status <= 599
    assert member.code and member.code == member.code.upper()
    assert member.message


@pytest.mark.parametrize(
    ("code", "message", "detail", "expected"),
    [
        (
            ErrorCode.BLOB_UNKNOWN, "blob unknown to registry", None,
            {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]},
        ),
        (
            ErrorCode.MANIFEST_UNKNOWN, "manifest unknown", {"tag": "latest"},
            {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                         "detail": {"tag": "latest"}}]},
        ),
        (
            ErrorCode.UPSTREAM_ERROR, "bad gateway", "text detail",
            {"errors": [{"code": "UNKNOWN", "message": "bad gateway", "detail": "text detail"}]},
        ),
        (  # falsy but present detail is kept
            ErrorCode.NAME_INVALID, "m", [],
            {"errors": [{"code": "NAME_INVALID", "message": "m", "detail": []}]},
        ),
        (
            ErrorCode.TAG_INVALID, 'quote " and \u00e9', None,
            {"errors": [{"code": "TAG_INVALID", "message": 'quote " and \u00e9'}]},
        ),
    ],
)  # fmt: skip
def test_error_body_envelope(
    code: ErrorCode, message: str, detail: Any, expected: dict[str, Any]
) -> None:
    body = error_body(code, message, detail)
    assert isinstance(body, bytes)
    assert json.loads(body) == expected


@pytest.mark.parametrize(
    ("error", "status", "message", "headers"),
    [
        (RegistryError(ErrorCode.BLOB_UNKNOWN), 404, "blob unknown to registry", {}),
        (RegistryError(ErrorCode.NAME_UNKNOWN, "no such registry"), 404, "no such registry", {}),
        (RegistryError(ErrorCode.UNKNOWN, "teapot", status=418), 418, "teapot", {}),
        (
            RegistryError(ErrorCode.TOOMANYREQUESTS, headers={"Retry-After": "30"}),
            429, "too many requests", {"Retry-After": "30"},
        ),
        (
            RegistryError(ErrorCode.RANGE_INVALID, headers={"Content-Range": "bytes */100"}),
            416, "requested range not satisfiable", {"Content-Range": "bytes */100"},
        ),
    ],
)  # fmt: skip
def test_registry_error_fields(
    error: RegistryError, status: int, message: str, headers: dict[str, str]
) -> None:
    assert (error.status, error.message, error.headers) == (status, message, headers)
    assert str(error) == f"{error.code.code}: {message}"


RENDER_CASES = [
    RegistryError(ErrorCode.MANIFEST_UNKNOWN, detail={"reference": "latest"}),
    RegistryError(ErrorCode.UNAVAILABLE, "origin down", headers={"Retry-After": "12"}),
    RegistryError(ErrorCode.RANGE_INVALID, headers={"Content-Range": "bytes */0"}),
    RegistryError(ErrorCode.UNKNOWN, "odd upstream status", status=418),
]


@pytest.mark.parametrize("error", RENDER_CASES)
def test_render_error_get_sends_the_envelope(error: RegistryError) -> None:
    response = render_error(error, "GET")
    assert response.status == error.status
    assert response.content_type == "application/json"
    for name, value in error.headers.items():
        assert response.headers[name] == value
    assert isinstance(response.body, bytes)
    expected: dict[str, Any] = {"code": error.code.code, "message": error.message}
    if error.detail is not None:
        expected["detail"] = error.detail
    assert json.loads(response.body) == {"errors": [expected]}


@pytest.mark.parametrize("error", RENDER_CASES)
def test_render_error_head_has_status_and_headers_but_no_body(error: RegistryError) -> None:
    response = render_error(error, "HEAD")
    assert response.status == error.status
    assert response.content_type == "application/json"
    for name, value in error.headers.items():
        assert response.headers[name] == value
    assert response.body is None
