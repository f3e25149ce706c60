"""Who owns a digest: rendezvous ranking, and the ring's view of its members."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter

import pytest

from mirror.config import ClusterConfig
from mirror.upstream.ring import Ring, own_url, peer_url, rank

PEERS = [f"http://10.0.0.{i}:5000" for i in (1, 2, 3)]
DIGESTS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]


def owners(peers: list[str]) -> dict[str, str]:
    return {d: rank(d, peers)[0] for d in DIGESTS}


def test_every_replica_computes_the_same_owner_whatever_order_it_lists_peers_in() -> None:
    assert owners(PEERS) == owners(list(reversed(PEERS)))


def test_digests_spread_evenly() -> None:
    shares = Counter(owners(PEERS).values())
    assert all(280 <= n <= 390 for n in shares.values()), shares


def test_a_fourth_peer_takes_about_a_quarter_and_moves_nothing_else() -> None:
    before = owners(PEERS)
    new = "http://10.0.0.4:5000"
    after = owners([*PEERS, new])
    moved = [d for d in DIGESTS if before[d] != after[d]]
    assert 200 <= len(moved) <= 300
    assert {after[d] for d in moved} == {new}  # only to the newcomer, never between old peers


def test_a_peer_leaving_moves_only_what_it_owned() -> None:
    before = owners(PEERS)
    after = owners(PEERS[:2])
    assert {d for d in DIGESTS if before[d] != after[d]} == {
        d for d in DIGESTS if before[d] == PEERS[2]
    }


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ring_for(me: str | None, clock: Clock, **cfg: object) -> Ring:
    return Ring(ClusterConfig(peers=tuple(PEERS), peer_down_for=30.0, **cfg), me, clock)  # type: ignore[arg-type]


def test_the_owner_itself_asks_no_peer_and_the_others_ask_it_first() -> None:
    clock = Clock()
    digest = DIGESTS[0]
    order = rank(digest, PEERS)
    assert ring_for(order[0], clock).owners(digest) == []
    assert ring_for(order[1], clock).owners(digest) == [order[0]]
    assert ring_for(order[2], clock).owners(digest) == order[:2]
    # A client of the ring (a node-local mirror) owns nothing: the owner, then the next.
    assert ring_for(None, clock).owners(digest) == order[:2]


def test_a_peer_marked_down_is_skipped_until_its_time_is_up() -> None:
    clock = Clock()
    digest = DIGESTS[1]
    order = rank(digest, PEERS)
    ring = ring_for(order[2], clock)
    ring.failed(order[0], "connect timeout")
    assert ring.owners(digest) == [order[1]]
    assert ring.down_count() == 1
    clock.now += 31
    assert ring.owners(digest) == order[:2]
    ring.failed(order[0], "reset")
    ring.answered(order[0])
    assert ring.owners(digest) == order[:2]


def test_a_dns_hiccup_keeps_the_last_membership() -> None:
    found: list[list[str] | OSError] = [["http://10.0.0.9:5000", "http://10.0.0.8:5000"], OSError()]

    async def resolve(host: str, port: int) -> list[str]:
        answer = found.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return sorted(answer)

    ring = Ring(ClusterConfig(peers_dns="mirror-peers:5000"), None, Clock(), resolve)

    async def twice() -> None:
        await ring.refresh()
        await ring.refresh()

    asyncio.run(twice())
    assert ring.peers == ("http://10.0.0.8:5000", "http://10.0.0.9:5000")


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [("10.1.2.3", 5000, "http://10.1.2.3:5000"), ("fd00::5", 5000, "http://[fd00::5]:5000")],
)
def test_peer_urls(host: str, port: int, url: str) -> None:
    assert peer_url(host, port) == url
    assert own_url(host, port) == url
