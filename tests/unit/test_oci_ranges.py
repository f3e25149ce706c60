"""Blob Range headers: the single bytes= range, 416 for what cannot be served, None to ignore."""

from __future__ import annotations

import pytest

from mirror.oci.ranges import UnsatisfiableRange, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        # bytes=N-
        ("bytes=0-", 100, (0, 99)),
        ("bytes=42-", 100, (42, 99)),
        ("bytes=99-", 100, (99, 99)),
        # bytes=N-M, end clamped to the last byte
        ("bytes=0-0", 100, (0, 0)),
        ("bytes=10-19", 100, (10, 19)),
        ("bytes=0-99", 100, (0, 99)),
        ("bytes=10-1000", 100, (10, 99)),
        ("bytes=5-5", 6, (5, 5)),
        # bytes=-K: the last K bytes, the whole body when K exceeds it
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1", 100, (99, 99)),
        ("bytes=-100", 100, (0, 99)),
        ("bytes=-1000", 100, (0, 99)),
        # spelling tolerated
        ("BYTES=0-9", 100, (0, 9)),
        (" bytes = 10-19 ", 100, (10, 19)),
        ("bytes= 1 - 2", 100, (1, 2)),
        # numbers past int()'s 4,300-digit limit mean past the end, like any too-big number
        pytest.param("bytes=0-" + "9" * 5000, 100, (0, 99), id="0-<5000 digits>"),
        pytest.param("bytes=-" + "9" * 5000, 100, (0, 99), id="-<5000 digits>"),
        pytest.param("bytes=" + "0" * 5000 + "7-" + "0" * 5000 + "9", 100, (7, 9), id="zeros"),
    ],
)
def test_parse_range(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-200", 100),
        ("bytes=100-100", 100),
        ("bytes=1000-2000", 100),
        ("bytes=0-0", 0),
        # bytes=N- past the end: a resume from a client that already has every byte
        ("bytes=100-", 100),
        ("bytes=1000-", 100),
        ("bytes=0-", 0),
        pytest.param("bytes=" + "9" * 5000 + "-", 100, id="<5000 digits>-"),
        pytest.param("bytes=" + "9" * 5000 + "-" + "9" * 5000, 2**63 - 1, id="both 5000 digits"),
        ("bytes=9223372036854775808-", 2**63 - 1),
    ],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, size)


def test_parse_range_zero_suffix_is_unsatisfiable() -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range("bytes=-0", 100)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "items=0-9",  # another unit
        "0-9",  # no unit
        "bytes=0-1,5-6",  # several ranges: a 200 with the whole body is correct
        "bytes=-5, 0-1",
        "bytes=",
        "bytes=-",
        "bytes=abc",
        "bytes=5",
        "bytes=a-b",
        "bytes=1-b",
        "bytes=20-10",  # last before first: invalid, so ignored
        "bytes=5--1",
        "bytes=--5",
        # digits outside ASCII: int() would read them, a client never sends them
        "bytes=\u0661-",  # Arabic-Indic one
        "bytes=0-\u0669\u0669",
        "bytes=-\u0665",
        "bytes=\uff11-",  # fullwidth one
        "bytes=\u00b2-",  # superscript two: isdigit() says yes, int() says no
    ],
)
def test_parse_range_ignored(header: str | None) -> None:
    assert parse_range(header, 100) is None


def test_parse_range_suffix_on_empty_body() -> None:
    try:
        span = parse_range("bytes=-5", 0)
    except UnsatisfiableRange:
        return
    assert span is None
