"""HTTP Range headers for blobs: the single `bytes=` range every registry client sends."""

from __future__ import annotations

import re

# ASCII only: str.isdigit() and int() also take "١" (Arabic-Indic one) or "²", which no
# client means; such a header is garbage, ignored like any other.
_NUMBER = re.compile(r"[0-9]*", re.ASCII)
# No blob is 10**19 bytes (sizes fit in 63 bits); a longer number only says "past any end".
# Cut here rather than handed to int(), which refuses strings past 4,300 digits.
_MAX_DIGITS = 19
_PAST_ANY_END = 10**_MAX_DIGITS


class UnsatisfiableRange(ValueError):
    """Answered with 416 and `Content-Range: bytes */<size>`."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=N-`, `bytes=N-M`, `bytes=-K` -> inclusive (start, end) within size.

    None means "serve the whole body" (no header, or a form we choose to ignore, like several
    ranges: a 200 with the full body is always a correct answer to a Range request).
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not _NUMBER.fullmatch(first) or not _NUMBER.fullmatch(last):
        return None  # signs, spaces inside numbers, garbage: not a range we answer
    if first == "" and last == "":
        return None
    suffix = _number(last) if first == "" else None
    start = _number(first) if first else 0
    end = _number(last) if last and first else size - 1
    if suffix is not None:
        if suffix <= 0:
            raise UnsatisfiableRange(header)
        if size == 0:
            return None  # nothing to take a suffix of: the (empty) whole body answers it
        return max(0, size - suffix), size - 1
    if start >= size:
        raise UnsatisfiableRange(header)
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


def _number(digits: str) -> int:
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _MAX_DIGITS else _PAST_ANY_END
