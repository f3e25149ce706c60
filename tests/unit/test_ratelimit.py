"""Reading Docker Hub's ratelimit-remaining header into a count."""

from __future__ import annotations

import pytest

from mirror.oci.ratelimit import parse_ratelimit_remaining


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("76;w=21600", 76),
        ("0;w=21600", 0),
        ("100", 100),
        (" 42 ;w=60", 42),
        ("10, 10;w=1, 50;w=60", 10),
        ('5000;w=21600;comment="x"', 5000),
        (None, None),
        ("", None),
        (";w=21600", None),
        ("abc;w=21600", None),
        ("-1;w=21600", None),
        ("+5;w=21600", None),
        ("1_000;w=21600", None),
        ("7.5;w=60", None),
        ("\u0665;w=60", None),  # Arabic-Indic five: int() would accept it
    ],
)
def test_parse_ratelimit_remaining(value: str | None, expected: int | None) -> None:
    assert parse_ratelimit_remaining(value) == expected
