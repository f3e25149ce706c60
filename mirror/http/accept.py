"""Taking new connections off the listening sockets' accept queues, many per wake-up."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from mirror.http.connections import ThrottledLog

ACCEPT_BATCH = 1024  # connections taken off the accept queue per wake-up, at most
# Out of descriptors or kernel memory: accepting again at once would only spin.
_ACCEPT_BACKOFF = 0.1
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address `host` resolves to (as
    loop.create_server binds them), all on one port even when `port` is 0."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Takes new connections off the accept queue in batches and hands each to the loop.

    libuv (uvloop's core) accepts one connection per loop iteration since 1.45 ("don't
    accept() connections in a loop"). Under load an iteration serves every busy connection
    and takes 100-400 ms, so new connections arrived faster than that were taken: they
    waited in the accept queue for seconds, and past its length their SYNs were dropped and
    retried after 1, 3, 7, 15 s. Here each wake-up of the listening socket accepts all that
    are queued (up to ACCEPT_BATCH) and opens a transport for each at once.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        sockets: list[socket.socket],
        batch: int = ACCEPT_BATCH,
    ) -> None:
        self._loop = loop
        self._factory = factory
        self.sockets = sockets
        self._batch = batch
        self._failed = ThrottledLog("accept_failed", loop)

    def start(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # gone before we took it
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                # The connection stays queued; try again in a moment, not in a busy loop.
                self._failed.add(error=exc.strerror)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(_ACCEPT_BACKOFF, self._resume, listener)
                return
            conn.setblocking(False)
            self._step(self._loop.connect_accepted_socket(self._factory, conn), conn)

    def _step(self, opening: Coroutine[Any, Any, object], conn: socket.socket) -> None:
        """Run connect_accepted_socket up to its next wait, here and now.

        As a task it would start on the loop's next iteration, and the protocol would see
        the connection one iteration later again: under load, 100-400 ms each. Run eagerly
        (what Python 3.12's eager tasks do), the transport exists at once and the request
        is read in the next iteration, as with the loop's own accept."""
        try:
            waiting = opening.send(None)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - one connection's failure ends only it
            conn.close()  # typically reset by the client before it was ours
            self._failed.add(error=f"{type(exc).__name__}: {exc}")
            return
        waiting.add_done_callback(lambda _: self._step(opening, conn))

    def _resume(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept, listener)
