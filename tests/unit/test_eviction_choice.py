"""The eviction choice: least recently used first, in-use entries skipped, only what is needed."""

from __future__ import annotations

import pytest

from mirror.storage.eviction import choose_victims, eviction_target

# (key, size, last access): a is the least recently used.
ROWS = [("a", 10, 1.0), ("b", 10, 2.0), ("c", 50, 3.0), ("d", 10, 4.0), ("e", 100, 5.0)]
TOTAL = sum(size for _, size, _ in ROWS)  # 180


@pytest.mark.parametrize(
    ("target", "in_use", "ceiling", "victims"),
    [
        (180, "", None, ""),  # at the target already
        (170, "", None, "a"),
        (160, "", None, "ab"),
        (100, "", None, "abcd"),
        (125, "a", None, "bc"),  # in use: skipped, the next in line goes instead
        (100, "a", None, "e"),  # reaching e made b, c and d unnecessary
        # c alone makes the room: a and b, taken before it, are given back.
        (130, "", None, "c"),
        # The newest entry is a blob too big for the low watermark: evict what the cap needs.
        (60, "e", 150, "c"),
        (60, "e", 165, "ab"),
        # What must stay exceeds even the cap: emptying the rest would not help, nothing goes.
        (60, "e", 90, ""),
        # Without a ceiling (an explicit target, `mirror cache gc`) everything else goes.
        (60, "e", None, "abcd"),
        (0, "", None, "abcde"),
    ],
)
def test_choose_victims(target: int, in_use: str, ceiling: int | None, victims: str) -> None:
    chosen = choose_victims(ROWS, TOTAL, target, frozenset(in_use), ceiling)
    sizes = {key: size for key, size, _ in ROWS}
    assert chosen == [(key, sizes[key]) for key in victims]


def test_a_shared_entry_is_one_row() -> None:
    """The index has one row per file: a layer in many images is weighed once."""
    assert choose_victims([("a", 10, 1.0), ("b", 10, 2.0)], 20, 10, frozenset()) == [("a", 10)]


@pytest.mark.parametrize(
    ("total", "cap", "expected"),
    [(90, 100, None), (91, 100, 80), (1000, 0, None)],
)
def test_eviction_target(total: int, cap: int, expected: int | None) -> None:
    assert eviction_target(total, cap, 0.9, 0.8) == expected
