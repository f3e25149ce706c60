"""Docker Hub rate-limit header values: how many pulls the origin says are left."""

from __future__ import annotations

import re

# The count is plain ASCII digits. int() alone would also take "+5", "٥" or "1_000", none of
# which a registry means; a header we cannot read must become None, never a wrong number.
_COUNT = re.compile(r"[0-9]+", re.ASCII)


def parse_ratelimit_remaining(value: str | None) -> int | None:
    """The count in a `ratelimit-remaining` value such as "76;w=21600", or None if unreadable.

    Docker Hub sends `<count>;w=<window seconds>`. The IETF draft these headers come from also
    allows several comma-separated policies (`10, 10;w=1`); the first item is the one in force,
    so only it is read.
    """
    if value is None:
        return None
    first = value.split(",", 1)[0]
    count = first.split(";", 1)[0].strip()
    if not _COUNT.fullmatch(count):
        return None
    return int(count)
