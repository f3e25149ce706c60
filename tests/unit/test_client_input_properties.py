"""Properties of the parsers that take client input: request paths and references, Range,
Accept and ns, each against a simple model of what it should do, on generated input."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mirror.http.parse import manifest_reference, query_ns, target_of
from mirror.oci.digest import Digest
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.mediatypes import accepted_types, is_acceptable
from mirror.oci.paths import Kind, UnknownRegistry, V2Path, parse_v2_path, route
from mirror.oci.ranges import UnsatisfiableRange, parse_range
from mirror.oci.reference import InvalidName, is_tag, parse_image_reference
from mirror.storage.layout import Layout

# Bounded so the whole file stays around a second or two.
settings.register_profile("client_input", max_examples=100, deadline=None, database=None)
settings.load_profile("client_input")

REGISTRIES = frozenset({"docker.io", "ghcr.io", "fake.test", "127.0.0.1:5000", "[::1]:5000"})

# Built from pieces rather than from the grammar's regexes: generating from a regex is slow.
_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
_alnum = st.text(_LOWER, min_size=1, max_size=4)
_component = st.builds(
    lambda a, sep, b: a + sep + b if sep else a,
    _alnum,
    st.sampled_from(["", ".", "_", "__", "-", "--"]),
    _alnum,
)
names = st.lists(_component, min_size=1, max_size=4).map("/".join)
tags = st.builds(
    str.__add__,
    st.sampled_from(_LOWER + "ABCZ_"),
    st.text(_LOWER + "ABCZ_.-", max_size=20),
)
hexes = st.binary(min_size=32, max_size=32).map(bytes.hex)
digests = hexes.map(lambda h: f"sha256:{h}")
# Anything a client could put after /v2/: separators, dots, escapes, odd characters.
tails = st.text(st.sampled_from("ab/._-:%2e@AZ09~ \\\x00é"), max_size=40) | st.builds(
    lambda parts: "/".join(parts),
    st.lists(st.sampled_from(["..", ".", "", "a", "_tags", "manifests", "blobs", "x:y", "A"])),
)


# -- request paths and references ---------------------------------------------------------------


@given(names, st.one_of(tags, digests), st.sampled_from(["manifests", "blobs"]))
def test_a_valid_path_parses_back_into_its_parts(name: str, ref: str, verb: str) -> None:
    kind = Kind.MANIFEST if verb == "manifests" else Kind.BLOB
    assert parse_v2_path(f"{name}/{verb}/{ref}") == V2Path(kind, name, ref)


@given(names)
def test_a_tags_list_path_parses_back_into_its_name(name: str) -> None:
    assert parse_v2_path(f"{name}/tags/list") == V2Path(Kind.TAGS, name)


@given(tails, st.text(max_size=20), st.sampled_from(sorted(REGISTRIES)))
@example("../../etc/manifests/passwd", "", "docker.io")
@example("a/manifests/..", "", "docker.io")
@example("_tags/manifests/x", "fake.test", "docker.io")
def test_no_request_path_escapes_the_cache_directory(tail: str, ns: str, default: str) -> None:
    """Whatever a client sends, what the handlers accept maps to a file under the tree the
    layout says: a tag under tags/<configured registry>/, a digest under blobs/."""
    layout = Layout(Path("/cache"))
    parsed = parse_v2_path(tail)
    if parsed.kind not in (Kind.MANIFEST, Kind.BLOB):
        return
    try:
        target = target_of(parsed.name, ns or None, REGISTRIES, default)
        digest = manifest_reference(parsed.reference)
    except RegistryError:
        return
    assert target.registry in REGISTRIES
    if digest is not None:
        path = layout.blob(digest)
        assert path.parent.parent.parent == layout.blobs and ".." not in path.parts
    else:
        path = layout.tag(target.registry, target.name, parsed.reference)
        under = path.relative_to(layout.root / "tags" / target.registry).parts
        assert ".." not in under and "." not in under and under[-2] == "_tags"
        assert "_tags" not in under[:-2]  # a repository cannot pose as another's tag folder


@given(st.text(max_size=80))
@example("sha256:" + "A" * 64)
@example(".INVALID_MANIFEST_NAME")
def test_a_manifest_reference_is_a_digest_a_tag_or_a_named_error(reference: str) -> None:
    try:
        digest = manifest_reference(reference)
    except RegistryError as exc:  # nothing else escapes
        expected = ErrorCode.DIGEST_INVALID if ":" in reference else ErrorCode.MANIFEST_UNKNOWN
        assert exc.code is expected and exc.status in (400, 404)
        return
    if digest is None:
        assert is_tag(reference)
    else:
        assert reference == str(digest) and len(digest.hex) == 64


@given(
    st.sampled_from(["", "ghcr.io/", "127.0.0.1:5000/"]),
    names,
    st.one_of(st.none(), tags),
    st.one_of(st.none(), hexes.map(lambda h: Digest("sha256", h))),
)
def test_an_image_reference_round_trips(
    prefix: str, name: str, tag: str | None, digest: Digest | None
) -> None:
    text = f"{prefix}{name}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = parse_image_reference(text)
    assert parse_image_reference(str(ref)) == ref
    assert ref.digest == digest
    assert ref.tag == (tag or ("latest" if digest is None else None))


# -- Range -----------------------------------------------------------------------------------


def range_model(start: int | None, end: int | None, size: int) -> tuple[int, int] | None | str:
    """RFC 9110's single byte range, told plainly: "416" when nothing of it can be served."""
    if start is None:  # bytes=-K: the last K bytes
        if end is None:
            return None
        if end == 0:
            return "416"
        return None if size == 0 else (max(0, size - end), size - 1)
    if start >= size:
        return "416"
    if end is None:
        return (start, size - 1)
    return None if end < start else (start, min(end, size - 1))


numbers = st.one_of(st.none(), st.integers(0, 300), st.integers(0, 10**30))


@given(numbers, numbers, st.integers(0, 200), st.sampled_from(["bytes", "BYTES", " bytes "]))
def test_range_agrees_with_the_rfc(
    start: int | None, end: int | None, size: int, unit: str
) -> None:
    header = f"{unit}={'' if start is None else start}-{'' if end is None else end}"
    expected = range_model(start, end, size)
    if expected == "416":
        with pytest.raises(UnsatisfiableRange):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == expected


@given(st.integers(4301, 6000), st.integers(1, 10**12), st.booleans())
def test_range_numbers_past_int_limits_mean_past_the_end(
    digits: int, size: int, first: bool
) -> None:
    huge = "9" * digits
    if first:
        with pytest.raises(UnsatisfiableRange):
            parse_range(f"bytes={huge}-", size)
    else:
        assert parse_range(f"bytes=0-{huge}", size) == (0, size - 1)
        assert parse_range(f"bytes=-{huge}", size) == (0, size - 1)


@given(st.text(max_size=60), st.integers(0, 10**15))
@example("bytes=٣-", 10)
@example("bytes=" + "1" * 5000 + "-", 10)
def test_range_answers_in_bounds_or_416_for_any_header(header: str, size: int) -> None:
    try:
        span = parse_range(header, size)
    except UnsatisfiableRange:
        return  # nothing else escapes
    if span is not None:
        assert 0 <= span[0] <= span[1] < size


# -- Accept ------------------------------------------------------------------------------------

media_types = st.sampled_from(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/json",
        "*/*",
    ]
)
params = st.sampled_from(["", ";q=0.5", "; charset=utf-8", ";q=1;x=y"])
entries = st.tuples(media_types, params, st.sampled_from(["", " ", "  "])).map(
    lambda t: f"{t[2]}{t[0]}{t[1]}{t[2]}"
)


@given(st.lists(entries, max_size=8))
def test_accept_lines_and_one_joined_header_mean_the_same(values: list[str]) -> None:
    """skopeo sends one Accept line per type, containerd one comma-joined header."""
    joined = accepted_types([", ".join(values)]) if values else accepted_types([])
    assert accepted_types(values) == joined
    assert accepted_types(values) == {v.split(";")[0].strip().lower() for v in values}


@given(media_types.filter(lambda m: m != "*/*"), st.lists(entries, max_size=5))
def test_a_type_is_acceptable_when_listed_or_when_anything_is(
    media_type: str, others: list[str]
) -> None:
    accepted = accepted_types(others)
    expected = not accepted or "*/*" in accepted or media_type in accepted
    assert is_acceptable(media_type, accepted) is expected
    assert is_acceptable(media_type, accepted_types([*others, media_type.upper() + ";q=0.1"]))


@given(st.lists(st.text(max_size=30), max_size=4))
def test_accept_never_raises(values: list[str]) -> None:
    assert all(t == t.strip().lower() and t for t in accepted_types(values))


# -- ns ----------------------------------------------------------------------------------------


@given(st.sampled_from(sorted(REGISTRIES)), names, st.text(max_size=10))
def test_ns_routes_after_exactly_one_decoding(registry: str, name: str, other: str) -> None:
    query = f"x={quote(other, safe='')}&ns={quote(registry, safe='')}&ns=ghcr.io"
    assert query_ns(query) == registry  # containerd encodes it once; the first one counts
    assert route(name, query_ns(query), REGISTRIES, "docker.io").registry == registry
    twice = quote(quote(registry, safe=""), safe="")
    assert query_ns(f"ns={twice}") == quote(registry, safe="")
    if quote(registry, safe="") != registry:  # an escape left in a registry name stays
        with pytest.raises(UnknownRegistry):
            route(name, query_ns(f"ns={twice}"), REGISTRIES, "docker.io")


@given(st.text(max_size=30), st.text(max_size=40))
@example("up%252elocal", "a")
@example("%66ake.test", "a")
def test_only_configured_registries_are_reachable(raw_ns: str, name: str) -> None:
    """Not an open proxy: whatever the client puts in ns or the path, the answer names a
    configured registry, or is a refusal."""
    try:
        target = route(name, query_ns(f"ns={raw_ns}"), REGISTRIES, "docker.io")
    except (UnknownRegistry, InvalidName):
        return
    assert target.registry in REGISTRIES
