"""Unparsable requests: one warning line a second at most, with a count, and no request bytes
in it; each one counted."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    LineTooLong,
)
from structlog.testing import capture_logs

from mirror.http.server import BadRequests, reason_of
from mirror.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_at_most_one_line_a_second_with_the_count_left_out() -> None:
    metrics, clock = Metrics(), Clock()
    bad = BadRequests(metrics.requests, clock, interval=1.0)
    with capture_logs() as logs:
        for _ in range(50):
            bad.note("Bad status line", "10.0.0.1")
            clock.now += 0.01  # 50 in half a second
        clock.now += 1.0
        bad.note("Bad status line", "10.0.0.2")
        clock.now += 5.0
        bad.note("Invalid header", "10.0.0.3")
    assert [(e["event"], e["log_level"], e["suppressed"], e["client"]) for e in logs] == [
        ("bad_request", "warning", 0, "10.0.0.1"),
        ("bad_request", "warning", 49, "10.0.0.2"),
        ("bad_request", "warning", 0, "10.0.0.3"),
    ]
    counted = metrics.registry.get_sample_value(
        "mirror_requests_total", {"kind": "other", "result": "error"}
    )
    assert counted == 52  # every one of them, logged or not


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (LineTooLong(b"Authorization: Bearer s3cr3t...", 8190),
         "Got more than 8190 bytes when reading"),
        # as aiohttp's C parser words them: llhttp's reason, then the bytes it stopped at
        (BadStatusLine(error="Bad status line:\n  Invalid HTTP version:\n\n  b'GET /secret'\n ^"),
         "Bad status line: Invalid HTTP version"),
        (BadHttpMethod(error="Invalid method encountered:\n\n  b'GARBAGE /secret'\n  ^"),
         "Invalid method encountered"),
        (BadStatusLine("GET /secret HTTP/9"), "Bad status line"),  # its pure-Python parser's
        (InvalidHeader(b"Authorization: Basic s3cr3t"), "Invalid HTTP header"),
        (BadHttpMessage("Missing 'Host' header in request."), "Missing"),
        (BadHttpMessage("Too many headers received"), "Too many headers received"),
        (ValueError("not from the parser"), "ValueError"),
    ],
)  # fmt: skip
def test_the_reason_names_the_problem_and_never_quotes_the_request(
    exc: BaseException, reason: str
) -> None:
    assert reason_of(exc) == reason
    assert "s3cr3t" not in reason_of(exc) and "secret" not in reason_of(exc)
