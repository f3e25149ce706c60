"""What marks a request between replicas of the regional tier (pure vocabulary).

A replica asking the owner of a digest sends PEER_HEADER. The owner then serves it from its
own levels (disk, bucket, origin) and never from another peer, so a request crosses at most
one hop. It grants nothing else: a client that sends it gets an ordinary pull, within the
configured registries, only without peer routing.
"""

from __future__ import annotations

from collections.abc import Mapping

PEER_HEADER = "X-Mirror-Peer"


def from_peer(headers: Mapping[str, str]) -> bool:
    return headers.get(PEER_HEADER, "") == "1"
