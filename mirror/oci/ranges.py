"""HTTP Range headers for blobs: the single `bytes=` range every registry client sends."""

from __future__ import annotations


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
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                raise UnsatisfiableRange(header)
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        raise UnsatisfiableRange(header)
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)
