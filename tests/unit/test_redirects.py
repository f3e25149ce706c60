"""Where a registry may send the mirror: the redirect policy as tables."""

from __future__ import annotations

import ipaddress

import pytest
from yarl import URL

from mirror.config.values import parse_hosts_or_networks
from mirror.upstream.redirects import RedirectPolicy, forbidden, shown

REGISTRY = URL("http://127.0.0.1:5000/v2/team/app/blobs/sha256:" + "a" * 64)
OTHER_REGISTRY = "http://localhost:5001"
POLICY = RedirectPolicy.of([str(REGISTRY.origin()), OTHER_REGISTRY])


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://127.0.0.1:5000/elsewhere?sig=x", None),  # the registry's own origin
        ("http://localhost:5001/v2/x", None),  # another configured registry
        ("https://cdn.example.com/blob?X-Amz-Signature=1", None),  # a name: judged on connect
        ("https://52.216.1.2/bucket/blob", None),
        ("http://10.20.30.40:9000/bucket", None),  # private networks hold object stores
        ("http://127.0.0.1:6000/admin", "loopback"),  # another local port
        ("http://127.8.9.10/", "loopback"),
        ("http://[::1]:5000/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4-mapped
        ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of 169.254.169.254
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fd00:ec2::254]/latest/", "metadata service"),
        ("http://100.100.100.200/latest/", "metadata service"),
        ("http://0.0.0.0:5000/", "this-host"),
        ("http://[::]/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://255.255.255.255/", "broadcast"),
        ("http://127.1/", "an address not in dotted form"),
        ("http://2130706433/", "an address not in dotted form"),
        ("file:///etc/passwd", "file: URLs are never followed"),
        ("gopher://cdn.example.com/", "gopher: URLs are never followed"),
    ],
)
def test_where_a_blob_may_be_redirected(target: str, reason: str | None) -> None:
    assert POLICY.refusal(REGISTRY, URL(target), may_leave=True) == reason


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://127.0.0.1:5000/v2/team/app/manifests/sha256:" + "b" * 64, None),
        ("/v2/team/app/manifests/v2", "a relative: URLs are never followed"),  # unjoined
        ("https://cdn.example.com/manifest", "only blobs may come from another origin"),
        ("http://127.0.0.1:6000/", "only blobs may come from another origin"),
        ("https://127.0.0.1:5000/", "only blobs may come from another origin"),  # other scheme
        ("file:///etc/passwd", "file: URLs are never followed"),
    ],
)
def test_manifests_tags_and_heads_stay_on_the_registry(target: str, reason: str | None) -> None:
    assert POLICY.refusal(REGISTRY, URL(target), may_leave=False) == reason


@pytest.mark.parametrize(
    ("allow", "target"),
    [
        ("127.0.0.1", "http://127.0.0.1:6000/bucket"),
        ("127.0.0.0/8", "http://127.3.3.3/bucket"),
        ("fd00:ec2::/32", "http://[fd00:ec2::254]/"),
        ("127.0.0.2, 127.0.0.1", "http://127.0.0.1:6000/bucket"),
    ],
)
def test_redirect_allow_lets_private_setups_through(allow: str, target: str) -> None:
    assert POLICY.refusal(REGISTRY, URL(target), may_leave=True) is not None
    policy = RedirectPolicy.of([str(REGISTRY.origin())], parse_hosts_or_networks(allow))
    assert policy.refusal(REGISTRY, URL(target), may_leave=True) is None
    # Still no manifest from there: allowing an address makes it a CDN, not the registry.
    assert policy.refusal(REGISTRY, URL(target), may_leave=False) is not None


@pytest.mark.parametrize(
    ("host", "port", "addresses", "refused"),
    [
        ("cdn.example.com", 443, ["52.216.1.2", "2600:1f18::1"], None),
        ("localhost", 80, ["127.0.0.1"], "localhost resolves to 127.0.0.1 (loopback)"),
        ("evil.example", 443, ["52.216.1.2", "169.254.169.254"],
         "evil.example resolves to 169.254.169.254 (link-local)"),  # one is enough
        ("evil.example", 443, ["::1"], "evil.example resolves to ::1 (loopback)"),
        ("localhost", 5001, ["127.0.0.1", "::1"], None),  # a configured registry
        ("LOCALHOST.", 5001, ["127.0.0.1"], None),
        ("localhost", 5002, ["127.0.0.1"], "localhost resolves to 127.0.0.1 (loopback)"),
    ],
)  # fmt: skip
def test_a_name_is_judged_by_the_addresses_it_resolves_to(
    host: str, port: int, addresses: list[str], refused: str | None
) -> None:
    assert POLICY.address_refusal(host, port, addresses) == refused


def test_an_allowed_name_may_resolve_anywhere() -> None:
    policy = RedirectPolicy.of([], parse_hosts_or_networks("s3.local, 10.0.0.0/8"))
    assert policy.address_refusal("s3.local", 9000, ["127.0.0.1"]) is None
    assert policy.address_refusal("other.local", 9000, ["127.0.0.1"]) is not None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1", "2a00::1"]
)
def test_ordinary_addresses_are_never_forbidden(address: str) -> None:
    assert forbidden(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("https://bucket.s3.amazonaws.com/key?X-Amz-Signature=secret", "https://bucket.s3.amazonaws.com"),
        ("http://[::1]:8080/x", "http://[::1]:8080"),
        ("file:///etc/passwd", "file: URL"),
    ],
)  # fmt: skip
def test_a_target_is_shown_without_its_path_or_query(url: str, text: str) -> None:
    assert shown(URL(url)) == text
