"""The OCI error table, its JSON envelope, and the one renderer in the middleware."""

from __future__ import annotations

import json
from email.utils import formatdate
from typing import Any

import pytest

from mirror.cache.errors import to_registry_error
from mirror.middleware import render_error
from mirror.oci.errors import ErrorCode, RegistryError, error_body
from mirror.upstream.errors import (
    MAX_RETRY_AFTER,
    UpstreamBodyError,
    UpstreamError,
    UpstreamUnavailable,
    parse_retry_after,
)

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


# -- what an upstream failure becomes for the client ----------------------------------------------

NOW = 1_700_000_000.0  # a wall-clock instant, so HTTP-dates are read without the real clock


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("  ", None),
        ("0", 0.0),
        ("7", 7.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("3600", 3600.0),
        ("3601", MAX_RETRY_AFTER),  # capped: one header must not lock a registry out for days
        ("99999999999999999999999", MAX_RETRY_AFTER),
        # an HTTP-date (RFC 9110's preferred form and the two obsolete ones)
        (formatdate(NOW + 120, usegmt=True), 120.0),
        (formatdate(NOW + 86400, usegmt=True), MAX_RETRY_AFTER),
        (formatdate(NOW - 60, usegmt=True), 0.0),  # already past: no wait
        (formatdate(NOW + 45), 45.0),  # "-0000" zone: GMT all the same
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),
        ("Sun Nov  6 08:49:37 1994", 0.0),
        # garbage never crashes and never becomes a wait
        ("inf", None),
        ("Infinity", None),
        ("nan", None),
        ("-5", None),
        ("+5", None),
        ("1e9", None),
        ("5 s", None),
        ("\u0665", None),  # a digit, but not an ASCII one
        ("soon", None),
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
        ("Wed, 21 Oct 99999 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


UNKNOWN_404 = ErrorCode.MANIFEST_UNKNOWN


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        # unknown content stays a 404 of the kind the caller names
        (UpstreamError(404, code="MANIFEST_UNKNOWN"), "MANIFEST_UNKNOWN", 404),
        (UpstreamError(404), "MANIFEST_UNKNOWN", 404),
        # "cannot serve now": a fast 503, never 502, 500 or 429
        (UpstreamError(500), "UNAVAILABLE", 503),
        (UpstreamError(502, code="UNKNOWN"), "UNAVAILABLE", 503),
        (UpstreamError(503, code="UNAVAILABLE"), "UNAVAILABLE", 503),
        (UpstreamError(504), "UNAVAILABLE", 503),
        (UpstreamError(429, code="TOOMANYREQUESTS", retry_after=7.0), "UNAVAILABLE", 503),
        (UpstreamUnavailable("fake.test unreachable: ClientConnectorError"), "UNAVAILABLE", 503),
        (TimeoutError(), "UNAVAILABLE", 503),
        (ConnectionResetError(), "UNAVAILABLE", 503),
        (UpstreamBodyError("body ended at byte 5 of 9"), "UNAVAILABLE", 503),
        # the origin's verdict on the request itself, with the spec's status
        (UpstreamError(400, code="NAME_INVALID"), "NAME_INVALID", 400),
        (UpstreamError(400, code="DIGEST_INVALID"), "DIGEST_INVALID", 400),
        (UpstreamError(400, code="TAG_INVALID"), "TAG_INVALID", 400),
        (UpstreamError(400, code="MANIFEST_INVALID"), "MANIFEST_INVALID", 400),
        (UpstreamError(400, code="BLOB_UNKNOWN"), "BLOB_UNKNOWN", 404),
        (UpstreamError(405, code="UNSUPPORTED"), "UNSUPPORTED", 405),
        (UpstreamError(416, code="RANGE_INVALID"), "RANGE_INVALID", 416),
        (UpstreamError(401, code="UNAUTHORIZED"), "DENIED", 403),
        (UpstreamError(403, code="DENIED"), "DENIED", 403),
        # never a 401 or a 429 from the mirror, whatever code the origin used
        (UpstreamError(400, code="UNAUTHORIZED"), "UNKNOWN", 502),
        (UpstreamError(400, code="TOOMANYREQUESTS"), "UNKNOWN", 502),
        # codes the mirror does not know: a 502 that says what the origin answered
        (UpstreamError(400, code="SIZE_INVALID"), "UNKNOWN", 502),
        (UpstreamError(418), "UNKNOWN", 502),
    ],
)
def test_to_registry_error(exc: BaseException, code: str, status: int) -> None:
    error = to_registry_error(exc, UNKNOWN_404)
    assert (error.code.code, error.status) == (code, status)
    assert error.status not in (401, 429)


def test_upstream_errors_name_the_registry_and_keep_the_upstream_status() -> None:
    error = to_registry_error(UpstreamError(500, "boom", registry="ghcr.io"), UNKNOWN_404)
    assert "ghcr.io" in error.message
    assert error.detail == {
        "registry": "ghcr.io",
        "upstream_status": 500,
        "upstream_message": "boom",
    }
    error = to_registry_error(
        UpstreamError(400, "too big", code="SIZE_INVALID", registry="quay.io"), UNKNOWN_404
    )
    assert "quay.io" in error.message
    assert error.detail["upstream_status"] == 400
    assert error.detail["upstream_code"] == "SIZE_INVALID"
    error = to_registry_error(
        UpstreamUnavailable("token endpoint failed", registry="quay.io"), UNKNOWN_404
    )
    assert error.detail == {"registry": "quay.io"}


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(None, None), (0.0, None), (7.0, "7"), (0.4, "1"), (MAX_RETRY_AFTER, "3600"),
     (float("inf"), None), (float("nan"), None)],
)  # fmt: skip
def test_throttled_retry_after_is_a_whole_number_of_seconds(
    retry_after: float | None, header: str | None
) -> None:
    error = to_registry_error(UpstreamError(429, retry_after=retry_after), UNKNOWN_404)
    assert error.headers.get("Retry-After") == header
