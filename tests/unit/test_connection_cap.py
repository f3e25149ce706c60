"""How many client connections fit under the descriptor limit, with a reserve for serving."""

from __future__ import annotations

import pytest

from mirror.http.connections import FDS_PER_CONNECTION, connection_cap, serving_reserve


@pytest.mark.parametrize(
    ("configured", "fd_limit", "reserved", "expected"),
    [
        (10_000, 1_048_576, 896, 10_000),  # a container's usual limit: the configured cap
        (10_000, 20_000, 896, (20_000 - 896) // FDS_PER_CONNECTION),  # lowered to fit
        (100, 20_000, 896, 100),
        (10_000, 1_024, 896, 32),  # the common soft default, when the hard one is no higher
        (10_000, 500, 896, 1),  # nothing left: still one, so the mirror answers at all
    ],
)
def test_the_cap_leaves_the_reserve_free(
    configured: int, fd_limit: int, reserved: int, expected: int
) -> None:
    cap = connection_cap(configured, fd_limit, reserved)
    assert cap == expected
    if cap > 1:
        assert cap * FDS_PER_CONNECTION + reserved <= fd_limit


def test_the_reserve_covers_the_upstream_pool_and_the_sendfile_threads() -> None:
    assert serving_reserve(512, 64) == serving_reserve(0, 0) + 512 + 2 * 64
    assert serving_reserve(0, 0) > 0
