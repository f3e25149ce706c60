"""Which blobs to evict: least recently used first, never one in use (a pure choice)."""

from __future__ import annotations

from collections.abc import Container, Iterable


def choose_victims(
    entries: Iterable[tuple[str, int, float]],
    total: int,
    target: int,
    in_use: Container[str],
) -> list[tuple[str, int]]:
    """(key, size, last_access) entries -> the (key, size) to delete, oldest access first, until
    `total` is at most `target`. Entries in use are skipped, so the result may fall short."""
    if total <= target:
        return []
    victims: list[tuple[str, int]] = []
    for key, size, _ in sorted(entries, key=lambda e: e[2]):
        if key in in_use:
            continue
        victims.append((key, size))
        total -= size
        if total <= target:
            break
    return victims


def eviction_target(total: int, cap: int, high: float, low: float) -> int | None:
    """Above the high watermark, evict down to the low one; None when nothing needs doing."""
    if cap <= 0 or total <= cap * high:
        return None
    return int(cap * low)
