"""Which blobs to evict: least recently used first, never one to keep (a pure choice)."""

from __future__ import annotations

from collections.abc import Container, Iterable


def choose_victims(
    entries: Iterable[tuple[str, int, float]],
    total: int,
    target: int,
    keep: Container[str],
    ceiling: int | None = None,
) -> list[tuple[str, int]]:
    """(key, size, last_access) entries -> the (key, size) to delete, oldest access first, until
    `total` is at most `target`. Entries to `keep` (in use, or just stored) are skipped, so the
    result may fall short.

    Victims the target turns out not to need are kept: when a big blob comes late in the order,
    the smaller, older ones taken before it were not what made the room.

    With a `ceiling` (the cap the automatic round enforces), entries to keep that alone exceed
    the target lower the goal to the ceiling, and when they exceed even that nothing is chosen:
    emptying the rest of the cache could not bring it under its cap."""
    rows = sorted(entries, key=lambda e: e[2])
    if ceiling is not None:
        kept = sum(size for key, size, _ in rows if key in keep)
        if kept > ceiling:
            return []
        if kept > target:
            target = ceiling
    if total <= target:
        return []
    victims: list[tuple[str, int]] = []
    for key, size, _ in rows:
        if key in keep:
            continue
        victims.append((key, size))
        total -= size
        if total <= target:
            break
    needed: list[tuple[str, int]] = []
    for key, size in reversed(victims):  # the most recently used first: they are the ones to keep
        if total + size <= target:
            total += size
        else:
            needed.append((key, size))
    needed.reverse()
    return needed


def eviction_target(total: int, cap: int, high: float, low: float) -> int | None:
    """Above the high watermark, evict down to the low one; None when nothing needs doing."""
    if cap <= 0 or total <= cap * high:
        return None
    return int(cap * low)
