"""The fast path's parser rules against aiohttp's own parser, the reference model: whatever
bytes a client sends, a request the fast path would answer itself is one aiohttp would also
parse, into the same method, target, headers, version and keep-alive. Anything else must be
handed to aiohttp, whose answer (a 400 among others) is then the same on both paths."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mirror.http.fastpath import FastProtocol, judge_header_names
from mirror.http.server import MAX_FIELD, MAX_HEADERS, MAX_LINE

settings.register_profile("fastpath_rules", max_examples=150, deadline=None, database=None)
settings.load_profile("fastpath_rules")


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.protocol: Any = None

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Fallback:
    """Stands in for aiohttp's protocol: records what was handed over."""

    def __init__(self) -> None:
        self.data = b""

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.data += data


class _FastPath:
    """Answers every request the protocol offers as answerable, and records it."""

    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.offered: list[Any] = []

    def header_names(self, names: tuple[bytes, ...]) -> tuple[bool, bool]:
        return judge_header_names(names)  # the real rule, without FastPath's memo

    def answer(self, req: Any, peer: str | None) -> bytes | None:
        if not req.answerable or req.method not in (b"GET", b"HEAD"):
            return None
        self.offered.append(req)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class _Connections:
    """Every connection admitted, no deadlines: the parsing rules alone are under test."""

    def admit(self, transport: Any) -> bool:
        return True

    def head_started(self, transport: Any) -> None:
        pass

    def head_done(self, transport: Any) -> None:
        pass

    def release(self, transport: Any) -> None:
        pass


def fast_path_offers(raw: bytes) -> list[Any]:
    """The requests the fast path would answer itself, fed `raw` in one piece."""
    loop = asyncio.new_event_loop()
    try:
        fast = _FastPath()
        protocol = FastProtocol(fast, _Fallback, loop, _Connections())  # type: ignore[arg-type]
        transport = _Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(raw)
        protocol.connection_lost(None)
        return fast.offered if transport.protocol is None else []
    finally:
        loop.close()


def aiohttp_parses(raw: bytes) -> list[Any] | None:
    """aiohttp's messages for `raw` with the limits the mirror runs it with, None if refused."""
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(
            None, loop, 2**16, max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
        )  # fmt: skip
        try:
            messages, _, _ = parser.feed_data(raw)
        except HttpProcessingError:
            return None
        return [message for message, _ in messages]
    finally:
        loop.close()


TARGET = "/v2/team/app/manifests/1.0?ns=fake.test"
methods = st.sampled_from(["GET", "HEAD", "GET", "POST", "CONNECT", "get", "G T"])
targets = st.one_of(
    st.just(TARGET),
    st.sampled_from(["*", "http://h/v2/x/manifests/y", "example.com:443", TARGET + "#frag"]),
    st.text(st.sampled_from("/v2ab?=&%#é\x00 "), min_size=1, max_size=12).map(lambda t: "/" + t),
    st.integers(8180, 8200).map(lambda n: TARGET + "&x=" + "y" * (n - len(TARGET) - 3)),
)
versions = st.sampled_from([" HTTP/1.1", " HTTP/1.0", "", " HTTP/0.9", " HTTP/2.0", " HTTP/1.1 "])
header_names = st.sampled_from(
    ["Host", "host", "Accept", "User-Agent", "Content-Length", "Transfer-Encoding", "Expect",
     "Connection", "Upgrade", "X-Request-ID", "Sec-WebSocket-Key1", "Bad Name", "X:Y", "É", ""]
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(["m", "0", "close", "keep-alive", "Upgrade", "h2c", "chunked", "100-continue"]),
    st.text(st.sampled_from("ab ,;\t\x00\x7fé"), max_size=6),
    st.integers(4000, 8200).map(lambda n: "v" * n),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=6)
line_ends = st.sampled_from(["\r\n", "\r\n", "\n"])


@given(methods, targets, versions, headers, line_ends, st.integers(0, 3))
@example("GET", TARGET, "", [], "\r\n", 0)  # HTTP/0.9: llhttp parses it, aiohttp does not serve it
@example("GET", TARGET, " HTTP/1.1", [("X" * 9000, "y")], "\r\n", 0)
@example("GET", TARGET, " HTTP/1.1", [("Host", "m"), ("X-Long", "v" * 8191)], "\r\n", 0)
@example("GET", TARGET, " HTTP/1.1", [("Host", "a"), ("Host", "b")], "\r\n", 0)
@example("GET", TARGET, " HTTP/1.1", [], "\r\n", 0)  # no Host
@example("GET", TARGET, " HTTP/1.1", [("Host", "m")], "\r\n", 129)  # too many headers
@example("GET", "*", " HTTP/1.0", [], "\r\n", 0)  # asterisk-form: OPTIONS only
def test_what_the_fast_path_answers_aiohttp_parses_the_same_way(
    method: str,
    target: str,
    version: str,
    fields: list[tuple[str, str]],
    eol: str,
    padding: int,
) -> None:
    fields = fields + [(f"X-Pad-{i}", "p") for i in range(padding)]
    head = f"{method} {target}{version}{eol}" + "".join(f"{k}: {v}{eol}" for k, v in fields)
    raw = (head + eol).encode("utf-8", "surrogateescape")
    offered = fast_path_offers(raw)
    if not offered:
        return  # handed to aiohttp: its rules, by construction
    parsed = aiohttp_parses(raw)
    assert parsed is not None, "the fast path would answer a request aiohttp refuses"
    assert len(parsed) == len(offered) == 1
    ours, theirs = offered[0], parsed[0]
    assert ours.method.decode() == theirs.method
    assert ours.url.decode("utf-8", "surrogateescape") == theirs.path
    assert [(k.decode(), v.decode("utf-8", "surrogateescape")) for k, v in ours.headers] == [
        (k.decode(), v.decode("utf-8", "surrogateescape")) for k, v in theirs.raw_headers
    ]
    assert (ours.http_10, ours.keep_alive) == (theirs.version == (1, 0), not theirs.should_close)
    assert not theirs.upgrade and not theirs.chunked


def test_a_plain_manifest_request_is_the_fast_paths_to_answer() -> None:
    """The property above says something only if the fast path answers some requests."""
    raw = f"GET {TARGET} HTTP/1.1\r\nHost: m\r\nAccept: */*\r\n\r\n".encode()
    [offered] = fast_path_offers(raw)
    assert offered.url == TARGET.encode() and offered.keep_alive
