"""No client can exhaust the mirror's connections or descriptors, and a dropped client is reset.

The real server (mirror.cli.serve.serve) runs on uvloop in a thread of its own, as production
runs, and the clients are raw sockets, so every test controls exactly which bytes are sent and
when, and can see what the kernel does (a FIN or a reset, sockets left in FIN-WAIT-1).
Deadlines are configured short (a fraction of a second) rather than waited out.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.config import Config
from mirror.http.connections import FDS_PER_CONNECTION

from .fakeregistry import FakeRegistry
from .harness import MiB, mirror_config, random_bytes
from .served import served_on_uvloop, server_sockets

HEAD_TIMEOUT = 0.4
# The server checks deadlines every quarter of one: closed by then, or never.
CLOSED_WITHIN = HEAD_TIMEOUT * 1.25 + 1.0
REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n"


def config_for(tmp_path: Path, fake: FakeRegistry, **server: Any) -> Config:
    config = mirror_config(tmp_path / "cache", fake.url)
    return replace(config, server=replace(config.server, access_log=False, **server))


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect(): the window is agreed on in the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body), or whatever came before EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def seconds_until_closed(sock: socket.socket, within: float) -> float:
    """How long until the server ends the connection (recv sees EOF or a reset)."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return float("inf")
    return time.monotonic() - started


def trickle(sock: socket.socket, data: bytes, gap: float, stop_after: float) -> None:
    """Send `data` a byte at a time, `gap` apart, until the server hangs up or time is up."""
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started > stop_after:
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            return
        time.sleep(gap)


def scrape(url: str, name: str, **labels: str) -> float:
    """One sample from the mirror's /metrics (a blocking request: call it in a thread)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Blocking socket work off the test's loop, which serves the fake registry meanwhile."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# ------------------------------------------------------------------ the request-head deadline


def _nothing(sock: socket.socket) -> None:
    pass


def _one_byte(sock: socket.socket) -> None:
    sock.sendall(b"G")


def _head_trickled(sock: socket.socket) -> None:
    trickle(sock, REQUEST, HEAD_TIMEOUT / 8, stop_after=CLOSED_WITHIN + 1)


def _second_head_trickled(sock: socket.socket) -> None:
    """A whole request first (answered), then the next head a byte at a time."""
    sock.sendall(REQUEST)
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    trickle(sock, REQUEST, HEAD_TIMEOUT / 8, stop_after=CLOSED_WITHIN + 1)


def _headers_forever(sock: socket.socket) -> None:
    """A head that never ends: one more header line before each deadline check."""
    sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")
    trickle(sock, b"X-Pad: 1\r\n" * 100, HEAD_TIMEOUT / 8, stop_after=CLOSED_WITHIN + 1)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-only"])
@pytest.mark.parametrize(
    "client",
    [_nothing, _one_byte, _head_trickled, _second_head_trickled, _headers_forever],
    ids=["silent", "one-byte", "trickled-head", "trickled-second-head", "endless-head"],
)
async def test_a_request_head_that_does_not_arrive_in_time_closes_the_connection(
    tmp_path: Path, fake: FakeRegistry, fast_path: bool, client: Callable[[socket.socket], None]
) -> None:
    config = config_for(tmp_path, fake, header_timeout=HEAD_TIMEOUT, fast_path=fast_path)
    with served_on_uvloop(config) as mirror:

        def attack() -> float:
            with connect(mirror.port) as sock:
                started = time.monotonic()
                client(sock)
                waited = seconds_until_closed(sock, CLOSED_WITHIN + 2)
                return time.monotonic() - started if waited != float("inf") else waited

        closed_after = await in_thread(attack)
        dropped = await in_thread(
            scrape, mirror.url, "mirror_connections_dropped_total", reason="header_timeout"
        )

    assert closed_after <= CLOSED_WITHIN + 0.5
    assert dropped == 1


async def test_a_slow_but_timely_client_is_served_on_both_paths(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """The deadline is for the whole head, so bytes that keep coming within it are fine, and a
    keep-alive connection may sit idle between requests for much longer than the deadline."""
    config = config_for(tmp_path, fake, header_timeout=HEAD_TIMEOUT)
    fake.add_image("team/app", "1.0", [b"layer"])
    manifest = b"GET /v2/team/app/manifests/1.0?ns=fake.test HTTP/1.1\r\nHost: mirror\r\n\r\n"
    with served_on_uvloop(config) as mirror:

        def client() -> list[bytes]:
            with connect(mirror.port) as sock:
                answers = []
                for request in (manifest, manifest, REQUEST):  # aiohttp, fast path, aiohttp
                    trickle(sock, request, HEAD_TIMEOUT / 4 / len(request), stop_after=5)
                    answers.append(read_response(sock))
                    time.sleep(HEAD_TIMEOUT * 2)  # idle between requests: not a head wait
                return answers

        answers = await in_thread(client)

    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3


# ------------------------------------------------------------------ accepting


async def test_new_connections_are_accepted_many_per_loop_iteration(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """With every loop iteration long (1,000 busy clients make them 100-400 ms), a listener
    that takes one connection per iteration leaves new ones queued for seconds. Here each
    iteration is stretched to 20 ms and counted: 50 new connections must all be answered
    within a few iterations, not one per iteration."""
    fake.add_image("team/app", "1.0", [b"layer"])
    path = "/v2/team/app/manifests/1.0?ns=fake.test"
    with served_on_uvloop(config_for(tmp_path, fake)) as mirror:
        async with aiohttp.ClientSession() as session:  # cached: the fast path answers it
            async with session.get(mirror.url + path) as resp:
                assert resp.status == 200
        loop = mirror.loop
        assert loop is not None
        iterations = [0]
        busy = [True]

        def stretch() -> None:  # every iteration's other work, as under load
            time.sleep(0.02)
            iterations[0] += 1
            if busy[0]:
                loop.call_soon(stretch)

        def newcomers() -> tuple[int, list[bytes]]:
            loop.call_soon_threadsafe(stretch)
            socks = [connect(mirror.port) for _ in range(50)]  # queued: handshakes are the kernel's
            try:
                start = iterations[0]
                for sock in socks:
                    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
                answers = [read_response(sock) for sock in socks]
                return iterations[0] - start, answers
            finally:
                busy[0] = False
                for sock in socks:
                    sock.close()

        took, answers = await in_thread(newcomers)

    assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
    assert took < 15  # one connection per iteration would take 50


# ------------------------------------------------------------------ the connection cap


async def test_connections_past_the_limit_get_a_503_and_the_limit_frees_up(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    config = config_for(tmp_path, fake, max_connections=4, header_timeout=30.0)
    with served_on_uvloop(config) as mirror:

        def clients() -> tuple[bytes, bytes, float]:
            held = [connect(mirror.port) for _ in range(4)]
            try:
                for sock in held[:2]:  # two in use, two idle: all count
                    sock.sendall(REQUEST)
                    assert read_response(sock).startswith(b"HTTP/1.1 200")
                with connect(mirror.port) as extra:
                    extra.sendall(REQUEST)
                    refused = read_response(extra)
                    closed = seconds_until_closed(extra, 5)
            finally:
                held.pop().close()
            time.sleep(0.2)  # the server sees the FIN on its next loop iteration
            try:
                with connect(mirror.port) as again:
                    again.sendall(REQUEST)
                    served = read_response(again)
            finally:
                for sock in held:
                    sock.close()
            return refused, served, closed

        refused, served, closed = await in_thread(clients)
        dropped = await in_thread(
            scrape, mirror.url, "mirror_connections_dropped_total", reason="limit"
        )
        limit = await in_thread(scrape, mirror.url, "mirror_connections_limit")

    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert b'"code": "UNAVAILABLE"' in body and b'"max_connections": 4' in body
    assert closed < 5
    assert served.startswith(b"HTTP/1.1 200")
    assert dropped >= 1 and limit == 4


async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard limit {hard} leaves nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        with served_on_uvloop(config_for(tmp_path, fake)) as mirror:
            raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = await in_thread(scrape, mirror.url, "mirror_connections_limit")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    assert raised == hard
    assert 0 < limit <= min(10000, hard // FDS_PER_CONNECTION)


# ------------------------------------------------------------------ resets


async def test_a_client_that_stops_reading_is_reset_and_leaves_no_orphan(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Dropped for taking no byte for client_idle_timeout: the client sees a reset (it must not
    mistake a cut body for a whole one), and the server keeps no FIN-WAIT-1 socket holding
    megabytes of unsent blob."""
    blob = random_bytes(16 * MiB, seed=6)
    digest = fake.add_blob("team/app", blob)
    config = config_for(tmp_path, fake, client_idle_timeout=0.5)
    path = f"/v2/team/app/blobs/{digest}?ns=fake.test"
    with served_on_uvloop(config) as mirror:
        async with aiohttp.ClientSession() as session:  # cache it first: the sendfile path
            async with session.get(mirror.url + path) as resp:
                assert await resp.read() == blob

        def stalled_client() -> tuple[str, list[str], int]:
            with connect(mirror.port, rcvbuf=4096) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
                assert sock.recv(1024).startswith(b"HTTP/1.1 200")
                own = sock.getsockname()[1]
                deadline = time.monotonic() + 10  # then stop reading, until the server acts
                while server_sockets(mirror.port, own) == ["ESTABLISHED"]:
                    assert time.monotonic() < deadline, "the stalled client was never dropped"
                    time.sleep(0.05)
                time.sleep(0.2)
                left = server_sockets(mirror.port, own)
                got = 0
                try:
                    while chunk := sock.recv(1 << 20):
                        got += len(chunk)
                except ConnectionResetError:
                    return "reset", left, got
                return "eof", left, got

        ending, left, got = await in_thread(stalled_client)

    assert ending == "reset"
    assert left == []  # no FIN_WAIT1 orphan
    assert got < len(blob)
