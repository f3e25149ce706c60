"""Which replica owns a digest: rendezvous hashing over the live peers, Kubernetes doing the
membership (a static list, or a headless Service re-resolved every few seconds).

Each peer's weight for a digest is a hash of the two; the owner is the highest. Every replica
computes the same order from the same membership with no coordination, and a peer coming or
going moves only the digests it owned or comes to own: about 1/N of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable

import structlog

from mirror.config import ClusterConfig

log = structlog.get_logger("mirror.ring")

MAX_PEERS = 2  # peers a fill asks before the bucket and the origin: the owner, and the next


def rank(key: str, peers: Iterable[str]) -> list[str]:
    """`peers` from the highest weight for `key` to the lowest (pure)."""
    return sorted(peers, key=lambda peer: _weight(peer, key), reverse=True)


def _weight(peer: str, key: str) -> bytes:
    return hashlib.sha256(f"{peer}\n{key}".encode()).digest()


def peer_url(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"http://[{host}]:{port}"
    except ValueError:
        pass
    return f"http://{host}:{port}"


def own_url(host: str, port: int) -> str:
    """This replica as peers reach it, when `self` is not configured: the listen address,
    or (listening on every address) the one this host's name resolves to."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostbyname(socket.gethostname())
    return peer_url(host, port)


async def resolve_peers(host: str, port: int) -> list[str]:
    """Every address a headless Service name has now, as peer URLs."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({peer_url(str(info[4][0]), port) for info in infos})


class Ring:
    """The peers as this replica sees them: who is there, who is down for a while."""

    def __init__(
        self,
        config: ClusterConfig,
        self_url: str | None,
        clock: Callable[[], float],
        resolve: Callable[[str, int], Awaitable[list[str]]] = resolve_peers,
    ) -> None:
        """`self_url`: this replica as its peers reach it, None for a client of the ring
        (a node-local mirror), which owns nothing and asks owners directly."""
        self._config = config
        self.self_url = self_url
        self._clock = clock
        self._resolve = resolve
        self._peers: tuple[str, ...] = tuple(config.peers)
        self._down: dict[str, float] = {}  # peer -> until when it is skipped

    @property
    def peers(self) -> tuple[str, ...]:
        """Members now, this replica included when it is one."""
        if self.self_url is not None and self.self_url not in self._peers:
            return (*self._peers, self.self_url)
        return self._peers

    def up(self) -> list[str]:
        now = self._clock()
        return [p for p in self.peers if p == self.self_url or self._down.get(p, 0.0) <= now]

    def owners(self, key: str) -> list[str]:
        """The peers to ask for `key` before the bucket and the origin: those ranked above
        this replica (none when it owns the key itself), at most MAX_PEERS of them."""
        ahead = []
        for peer in rank(key, self.up()):
            if peer == self.self_url:
                break
            ahead.append(peer)
        return ahead[:MAX_PEERS]

    def failed(self, peer: str, why: str) -> None:
        """Skip `peer` for peer_down_for: the ranking moves on to the next one meanwhile."""
        if self._down.get(peer, 0.0) <= self._clock():
            log.warning("peer_down", peer=peer, reason=why, for_s=self._config.peer_down_for)
        self._down[peer] = self._clock() + self._config.peer_down_for

    def answered(self, peer: str) -> None:
        if self._down.pop(peer, None) is not None:
            log.info("peer_up", peer=peer)

    def down_count(self) -> int:
        now = self._clock()
        return sum(1 for p in self.peers if self._down.get(p, 0.0) > now)

    async def refresh(self) -> None:
        target = self._config.dns_target
        if target is None:
            return
        try:
            found = await self._resolve(*target)
        except OSError as exc:  # keep the last membership: a DNS hiccup is not an exodus
            log.warning("peers_unresolved", name=target[0], error=str(exc))
            return
        if tuple(found) != self._peers:
            log.info("peers_changed", peers=found, before=list(self._peers))
            self._peers = tuple(found)

    async def follow(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Re-resolve the headless Service forever (the app cancels it at shutdown)."""
        while True:
            await self.refresh()
            await sleep(self._config.resolve_interval)
