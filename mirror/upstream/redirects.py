"""Where a registry may send the mirror (redirects, token realms): the policy, pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Addresses no CDN or object store has, past the ones ipaddress classifies for us.
_NEVER = (
    (ipaddress.ip_network("0.0.0.0/8"), "this-host"),  # Linux connects 0.x to the local host
    (ipaddress.ip_network("255.255.255.255/32"), "broadcast"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "metadata service"),  # EC2's, over IPv6
    (ipaddress.ip_network("100.100.100.200/32"), "metadata service"),  # Alibaba Cloud's
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # an IPv4 address behind a NAT64 prefix


def forbidden(ip: Address) -> str | None:
    """Why nothing from a registry may lead to `ip` (loopback, link-local...), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return forbidden(ip.ipv4_mapped)
        if ip in _NAT64:
            return forbidden(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for network, reason in _NEVER:
        if ip in network:
            return reason
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:  # 169.254.169.254, the metadata service of most clouds, is one
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    return None


def shown(url: URL) -> str:
    """A target as it may appear in answers and logs: scheme, host and port, never the path
    and query (a presigned URL's signature)."""
    if url.scheme in ("http", "https") and url.host:
        return str(url.origin())
    return f"{url.scheme or 'a relative'}: URL"


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RedirectPolicy:
    """`origins`: the registries' own (host, port), always reachable however they resolve;
    `hosts` and `networks`: what `upstream.redirect_allow` lets through besides."""

    origins: frozenset[tuple[str, int]] = frozenset()
    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def of(
        cls, registry_urls: Iterable[str], allow: Iterable[str | Network] = ()
    ) -> RedirectPolicy:
        origins = set()
        for text in registry_urls:
            url = URL(text)
            if url.host is not None and url.port is not None:
                origins.add((url.host.lower(), url.port))
        allowed = tuple(allow)
        return cls(
            frozenset(origins),
            frozenset(a for a in allowed if isinstance(a, str)),
            tuple(a for a in allowed if not isinstance(a, str)),
        )

    def refusal(self, registry: URL, target: URL, *, may_leave: bool) -> str | None:
        """Why `target`, where the registry at `registry` sent the mirror, may not be asked,
        or None. A host name passes here; the addresses it resolves to are checked when the
        connection is made (`address_refusal`)."""
        if target.scheme not in ("http", "https"):
            return f"{target.scheme or 'a relative'}: URLs are never followed"
        host = (target.host or "").lower()
        if not host:
            return "the URL names no host"
        if target.origin() == registry.origin():
            return None
        if not may_leave:
            return "only blobs may come from another origin"
        if (host, target.port) in self.origins or host.rstrip(".") in self.hosts:
            return None
        ip = _literal(host)
        if ip is None:
            if host.replace(".", "").isdigit():  # 127.1 or 2130706433: an address in disguise
                return "an address not in dotted form"
            return None
        return self._refused(ip)

    def address_refusal(self, host: str, port: int, addresses: Iterable[str]) -> str | None:
        """Why the mirror may not connect to `host`, which resolved to `addresses`, or None.
        One forbidden address refuses the name: a name that also leads here is no CDN's."""
        name = host.lower().rstrip(".")
        if (name, port) in self.origins or name in self.hosts:
            return None
        for text in addresses:
            ip = _literal(text)
            reason = "not an address" if ip is None else self._refused(ip)
            if reason is not None:
                return f"{host} resolves to {text} ({reason})"
        return None

    def _refused(self, ip: Address) -> str | None:
        if any(ip.version == n.version and ip in n for n in self.networks):
            return None
        return forbidden(ip)
