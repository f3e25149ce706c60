"""How a blob is cut into Range requests once the first one has answered, and the prefix the
pieces under way leave written."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest

from mirror.cache.pieces import MIN_PIECE, Piece, Pieces, plan_pieces

MiB = 1024 * 1024
TiB = 1024 * 1024 * MiB


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
    assert list(plan_pieces(total, covered, chunk, threshold, streams)) == expected


@pytest.mark.parametrize("total", [32 * MiB + 1, 100 * MiB + 7, 3500 * MiB + 123])
@pytest.mark.parametrize("streams", [1, 3, 8, 16])
def test_pieces_tile_the_rest_exactly(total: int, streams: int) -> None:
    pieces = list(plan_pieces(total, 4 * MiB, 16 * MiB, 32 * MiB, streams))
    assert pieces[0][0] == 4 * MiB and pieces[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
    assert all(e - s <= 16 * MiB for s, e in pieces)
    assert all(e - s >= MIN_PIECE for s, e in pieces[:-1])  # only the tail may be short
    assert len(pieces) >= min(streams, (total - 4 * MiB) // (16 * MiB))  # every stream has work


def test_a_huge_declared_size_costs_nothing_until_pieces_are_taken() -> None:
    # The size is whatever the upstream declared: 16 TiB in 16 MiB pieces is a million of
    # them, which a list would hold all at once (132 MiB, seconds on the event loop).
    tracemalloc.start()
    try:
        pieces = plan_pieces(16 * TiB, 4 * MiB, 16 * MiB, 32 * MiB, 8)
        first = list(itertools.islice(pieces, 3))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first == [(4 * MiB + i * 16 * MiB, 4 * MiB + (i + 1) * 16 * MiB) for i in range(3)]
    assert peak < 64 * 1024, peak


def test_the_prefix_ends_at_the_earliest_unfinished_piece() -> None:
    head = Piece(0, 10, 0)
    pieces = Pieces(head, iter([(10, 20), (20, 30), (30, 40)]))
    a, b = pieces.take(), pieces.take()
    assert a is not None and b is not None
    b.pos = b.end  # a later piece done first: the prefix waits for the earlier ones
    pieces.finish(b)
    assert pieces.prefix() == 0
    head.pos = 10
    pieces.finish(head)
    assert pieces.prefix() == 10
    a.pos = 15
    assert pieces.prefix() == 15
    a.pos = 20
    pieces.finish(a)
    assert pieces.prefix() == 30  # b was done: through its end, and nothing else is out
    c = pieces.take()
    assert c is not None and pieces.prefix() == 30
    c.pos = 40
    pieces.finish(c)
    assert pieces.take() is None
    assert pieces.prefix() == 40


def test_a_body_of_unknown_length_ends_the_prefix_where_it_ends() -> None:
    only = Piece(0, 2**62, 0)
    pieces = Pieces(only, iter(()))
    only.pos = 1234
    only.end = only.pos  # the body ended: that is the blob's end
    pieces.finish(only)
    assert pieces.prefix() == 1234
