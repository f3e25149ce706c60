"""How a blob is cut into Range requests, handed out one at a time, and the prefix they tile."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MIN_PIECE = 1024 * 1024  # smaller Range requests cost more in round trips than they gain


def plan_pieces(
    total: int, covered: int, chunk_size: int, threshold: int, streams: int
) -> Iterator[tuple[int, int]]:
    """The Range requests (start, end exclusive) left once the first one covered [0, covered).

    A large blob is cut so that every stream has a piece (never more than chunk_size, never
    less than MIN_PIECE): per-connection caps on long-haul links are what parallel streams
    beat, and a fixed chunk size would leave streams idle on blobs of a few chunks. Below the
    threshold the rest is one more request.

    Generated as they are taken: `total` is whatever the upstream declared, and a list of every
    piece would cost memory and time on the event loop in proportion to it.
    """
    if total <= covered:
        return
    if total < threshold:
        yield covered, total
        return
    step = min(chunk_size, max(MIN_PIECE, -(-(total - covered) // streams)))
    for start in range(covered, total, step):
        yield start, min(start + step, total)


@dataclass(slots=True)
class Piece:
    start: int
    end: int  # exclusive
    pos: int  # the next byte to write


class Pieces:
    """Hands pieces out in offset order and tracks the ones under way.

    Every byte before the earliest unfinished piece is written, so that is where the contiguous
    prefix ends. Only the pieces taken and not yet finished are held: one per stream, whatever
    the blob's size.
    """

    def __init__(self, first: Piece, rest: Iterator[tuple[int, int]]) -> None:
        self._rest = rest
        self._open = [first]
        self._last = first  # the furthest piece handed out

    def take(self) -> Piece | None:
        span = next(self._rest, None)
        if span is None:
            return None
        piece = Piece(span[0], span[1], span[0])
        self._open.append(piece)
        self._last = piece
        return piece

    def finish(self, piece: Piece) -> None:
        self._open.remove(piece)

    def prefix(self) -> int:
        """Bytes [0, prefix) are all written."""
        # A finished piece not yet let go of holds nothing back. _last.end, not a copy of it:
        # a body of unknown length sets its end when it ends.
        return min((p.pos for p in self._open if p.pos < p.end), default=self._last.end)
