"""The mirror as `mirror serve` runs it (mirror.cli.serve.serve on free ports), for raw-socket
tests: in the test's own event loop, or on uvloop in a thread of its own, as production runs.
Also what those tests read off the kernel: the TCP states of the server's sockets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvloop

from mirror.cli.serve import serve
from mirror.config import Config

# /proc/net/tcp's state column (include/net/tcp_states.h)
TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


@dataclass(frozen=True)
class Served:
    port: int
    admin_port: int
    loop: asyncio.AbstractEventLoop | None = None  # the server's own, when not the test's

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@asynccontextmanager
async def served(config: Config) -> AsyncIterator[Served]:
    """serve() as a task of the running loop, until the block ends."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main: asyncio.Future[int] = loop.create_future()
    admin: asyncio.Future[int] = loop.create_future()
    task = asyncio.create_task(
        serve(config, stop, lambda s: main.set_result(s[0][1]), lambda s: admin.set_result(s[0][1]))
    )
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.gather(main, admin)), 10)
        yield Served(main.result(), admin.result())
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@contextmanager
def served_on_uvloop(config: Config) -> Iterator[Served]:
    """serve() on a uvloop event loop in a thread, until the block ends. The test's own loop
    stays free, so it can serve the fake registry meanwhile (await, do not block, in it)."""
    ready = threading.Event()
    found: dict[str, object] = {}

    async def run() -> None:
        stop = asyncio.Event()
        found["stop"] = (asyncio.get_running_loop(), stop)

        def bound(name: str) -> object:
            def note(sockets: list[tuple[str, int]]) -> None:
                found[name] = sockets[0][1]
                if "main" in found and "admin" in found:
                    ready.set()

            return note

        await serve(config, stop, bound("main"), bound("admin"))  # type: ignore[arg-type]

    def thread() -> None:
        try:
            uvloop.run(run())
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            found["error"] = exc
            ready.set()

    runner = threading.Thread(target=thread, name="mirror-uvloop", daemon=True)
    runner.start()
    try:
        assert ready.wait(10), "the mirror did not start"
        if "error" in found:
            raise AssertionError(f"the mirror failed: {found['error']!r}")
        loop, _ = found["stop"]  # type: ignore[misc]
        yield Served(int(found["main"]), int(found["admin"]), loop)  # type: ignore[call-overload]
    finally:
        if "stop" in found:
            loop, stop = found["stop"]  # type: ignore[misc]
            loop.call_soon_threadsafe(stop.set)
        runner.join(20)
        assert not runner.is_alive(), "the mirror did not stop"


def server_sockets(port: int, peer_port: int) -> list[str]:
    """TCP states of the sockets on local `port` whose peer is on `peer_port` (IPv4)."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == peer_port:
            states.append(TCP_STATES.get(state, state))
    return states
