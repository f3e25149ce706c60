"""Digest parsing: only well-formed sha256 survives to become a path."""

from __future__ import annotations

import pytest

from mirror.oci.digest import Digest, InvalidDigest, looks_like_digest, parse_digest

HEX = "a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sha256:{HEX}", Digest("sha256", HEX)),
        ("sha256:" + "0" * 64, Digest("sha256", "0" * 64)),
        ("sha256:" + "f" * 64, Digest("sha256", "f" * 64)),
    ],
)
def test_parse_digest_accepts(text: str, expected: Digest) -> None:
    digest = parse_digest(text)
    assert digest == expected
    assert str(digest) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid digest"),
        ("sha256:", "invalid digest"),
        (HEX, "invalid digest"),  # no algorithm
        ("sha256:" + HEX[:-1], "invalid digest"),  # 63 hex
        ("sha256:" + HEX + "0", "invalid digest"),  # 65 hex
        ("sha256:" + HEX.upper(), "invalid digest"),  # hex must be lower case
        ("SHA256:" + HEX, "invalid digest"),
        ("sha256:" + "g" * 64, "invalid digest"),
        (f" sha256:{HEX}", "invalid digest"),
        (f"sha256:{HEX}\n", "invalid digest"),
        ("sha256:../../../../etc/passwd", "invalid digest"),
        ("sha512:" + "a" * 128, "unsupported digest algorithm"),
        ("md5:d41d8cd98f00b204e9800998ecf8427e", "unsupported digest algorithm"),
        ("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8", "unsupported"),
    ],
)
def test_parse_digest_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidDigest, match=message):
        parse_digest(text)


def test_invalid_digest_is_a_value_error() -> None:
    assert issubclass(InvalidDigest, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sha256:{HEX}", True),
        ("sha256:short", True),  # shape only: parse_digest decides validity
        ("latest", False),
        ("v1.2.3", False),
        ("", False),
    ],
)
def test_looks_like_digest(text: str, expected: bool) -> None:
    assert looks_like_digest(text) is expected
