"""How a blob is cut into Range requests once the first one has answered."""

from __future__ import annotations

import pytest

from mirror.cache.download import MIN_PIECE, plan_pieces

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("total", "covered", "chunk", "threshold", "streams", "expected"),
    [
        # the first request already held it all
        (3 * MiB, 4 * MiB, 16 * MiB, 32 * MiB, 8, []),
        (4 * MiB, 4 * MiB, 16 * MiB, 32 * MiB, 8, []),
        # below the threshold: one more request for the rest
        (20 * MiB, 4 * MiB, 16 * MiB, 32 * MiB, 8, [(4 * MiB, 20 * MiB)]),
        # 32 MiB on 8 streams: 28 MiB left in 8 pieces of 3.5 MiB, not 2 chunks of 16
        (32 * MiB, 4 * MiB, 16 * MiB, 32 * MiB, 8,
         [(4 * MiB + i * 3670016, 4 * MiB + (i + 1) * 3670016) for i in range(8)]),
        # large blobs: pieces are capped at chunk_size
        (132 * MiB, 4 * MiB, 16 * MiB, 32 * MiB, 8,
         [(4 * MiB + i * 16 * MiB, 4 * MiB + (i + 1) * 16 * MiB) for i in range(8)]),
    ],
)  # fmt: skip
def test_plan_pieces(
    total: int, covered: int, chunk: int, threshold: int, streams: int,
    expected: list[tuple[int, int]],
) -> None:  # fmt: skip
    assert plan_pieces(total, covered, chunk, threshold, streams) == expected


@pytest.mark.parametrize("total", [32 * MiB + 1, 100 * MiB + 7, 3500 * MiB + 123])
@pytest.mark.parametrize("streams", [1, 3, 8, 16])
def test_pieces_tile_the_rest_exactly(total: int, streams: int) -> None:
    pieces = plan_pieces(total, 4 * MiB, 16 * MiB, 32 * MiB, streams)
    assert pieces[0][0] == 4 * MiB and pieces[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
    assert all(e - s <= 16 * MiB for s, e in pieces)
    assert all(e - s >= MIN_PIECE for s, e in pieces[:-1])  # only the tail may be short
    assert len(pieces) >= min(streams, (total - 4 * MiB) // (16 * MiB))  # every stream has work
