"""Properties of the parsers for what operators and origins send: config values (sizes,
durations, listen addresses) and WWW-Authenticate challenges, on generated input."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mirror.config.values import format_size, parse_duration, parse_listen, parse_size
from mirror.upstream.auth import parse_challenges

settings.register_profile("values", max_examples=100, deadline=None, database=None)
settings.load_profile("values")

SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
              "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
              "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}  # fmt: skip
DURATION_UNITS = {"": 1, "s": 1, "ms": 0.001, "m": 60, "h": 3600, "d": 86400}
spaces = st.sampled_from(["", " ", "  "])


def cased(text: str, upper: list[bool]) -> str:
    flags = (upper + [False] * len(text))[: len(text)]
    return "".join(c.upper() if u else c for c, u in zip(text, flags, strict=True))


# -- sizes and durations -------------------------------------------------------------------


@given(st.integers(0, 10**6), st.sampled_from(sorted(SIZE_UNITS)), st.lists(st.booleans()), spaces)
def test_a_size_is_its_number_times_its_unit(
    number: int, unit: str, upper: list[bool], pad: str
) -> None:
    text = f"{pad}{number}{pad}{cased(unit, upper)}{pad}"
    assert parse_size(text) == number * SIZE_UNITS[unit]


@given(st.integers(0, 2**62))
def test_a_whole_number_of_bytes_is_itself_as_int_or_text(number: int) -> None:
    assert parse_size(number) == parse_size(str(number)) == number


@given(st.one_of(st.text(max_size=30), st.floats(), st.integers(-(10**30), 10**30)))
@example("9" * 400)  # float("9" * 400) is inf: no size, and no OverflowError either
@example("1e3MiB")
@example("١٢MiB")
def test_a_size_is_a_non_negative_int_or_a_value_error(value: object) -> None:
    try:
        size = parse_size(value)
    except ValueError:
        return  # what the config loader reports, naming the key: nothing else escapes
    assert isinstance(size, int) and size >= 0


@given(st.integers(0, 2**50))
@example(2304)  # 2.25 KiB shows as "2.2 KiB"
def test_format_size_reads_back_within_its_rounding(size: int) -> None:
    number, unit = format_size(size).split()
    back = parse_size(f"{number}{unit}")
    # half of the last digit shown, and the byte parse_size's truncation may take off
    assert abs(back - size) <= 0.05 * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(unit) + 1


@given(
    st.integers(0, 10**6),
    st.sampled_from(sorted(DURATION_UNITS)),
    st.lists(st.booleans()),
    spaces,
)
def test_a_duration_is_its_number_times_its_unit(
    number: int, unit: str, upper: list[bool], pad: str
) -> None:
    text = f"{pad}{number}{pad}{cased(unit, upper)}{pad}"
    assert parse_duration(text) == pytest.approx(number * DURATION_UNITS[unit])


@given(st.one_of(st.text(max_size=30), st.floats(), st.integers(-(10**30), 10**30)))
@example("9" * 400)
@example(float("inf"))
@example(float("nan"))
def test_a_duration_is_finite_and_non_negative_or_a_value_error(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert isinstance(seconds, float) and math.isfinite(seconds) and seconds >= 0


# -- listen addresses ----------------------------------------------------------------------

ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_label = st.builds(str.__add__, st.sampled_from("abcxyz"), st.text("abz09-", max_size=8))
hostnames = st.lists(_label, min_size=1, max_size=3).map(".".join)
ipv6 = st.sampled_from(["::1", "::", "fe80::1", "2001:db8::42"])


@given(st.one_of(ipv4, hostnames), st.integers(0, 65535))
def test_host_and_port_read_back(host: str, port: int) -> None:
    assert parse_listen(f"{host}:{port}") == (host, port)


@given(ipv6, st.integers(0, 65535))
def test_an_ipv6_address_needs_brackets_and_reads_back_without_them(host: str, port: int) -> None:
    assert parse_listen(f"[{host}]:{port}") == (host, port)
    with pytest.raises(ValueError):
        parse_listen(f"{host}:{port}")


@given(st.integers(0, 65535))
def test_a_bare_port_listens_everywhere(port: int) -> None:
    assert parse_listen(f":{port}") == ("0.0.0.0", port)


@given(st.text(max_size=30))
@example(":١٢")  # Arabic-Indic digits are digits to str.isdigit(), not to a port
@example(":" + "9" * 5000)
@example(":65536")
def test_a_listen_address_is_a_port_in_range_or_a_value_error(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except ValueError:
        return
    port_text = text.rpartition(":")[2]
    assert port_text.isascii() and port_text.isdigit() and int(port_text) == port <= 65535
    assert host


# -- WWW-Authenticate challenges -----------------------------------------------------------

schemes = st.sampled_from(["Bearer", "bearer", "Basic", "BEARER", "Negotiate"])
param_names = st.sampled_from(["realm", "service", "scope", "error", "Realm"])
values = st.text(st.characters(codec="ascii", exclude_characters="\r\n\t"), max_size=30)


def quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(
    st.lists(
        st.tuples(schemes, st.dictionaries(param_names, values, min_size=1, max_size=4)),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from([",", ", ", " , "]),
)
def test_a_challenge_header_parses_back_into_what_was_written(
    challenges: list[tuple[str, dict[str, str]]], between: str
) -> None:
    # One header per origin may hold several challenges, each with quoted parameters.
    written = []
    for scheme, params in challenges:
        unique = {k.lower(): v for k, v in params.items()}
        written.append((scheme.lower(), unique))
    header = between.join(
        f"{scheme} " + ",".join(f"{k}={quoted(v)}" for k, v in params.items())
        for scheme, params in written
    )
    parsed = [(c.scheme, dict(c.params)) for c in parse_challenges(header)]
    assert parsed == written


@given(st.text(max_size=80))
@example('Bearer realm="unterminated')
@example("Bearer realm=a,,,,service=b")
def test_any_header_parses_into_challenges_without_raising(header: str) -> None:
    for challenge in parse_challenges(header):
        assert challenge.scheme == challenge.scheme.lower() and challenge.scheme
        assert all(k == k.lower() for k in challenge.params)
