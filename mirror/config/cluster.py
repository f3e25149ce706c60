"""The [cluster] section: peer URLs and addresses, and the checks across its keys."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from mirror.config.model import ClusterConfig
from mirror.config.values import optional_str, parse_duration

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]")


def peer_url(value: Any) -> str:
    """A peer's base URL, normalised so two spellings of one peer compare equal:
    "HTTP://Mirror-0.peers:5000/" -> "http://mirror-0.peers:5000"."""
    text = str(value).strip() if isinstance(value, str) else None
    parts = urlsplit(text) if text else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"expected a base URL http(s)://host:port with no path, got {value!r}")
    host, port = _host_port(parts.netloc, value)
    return f"{parts.scheme}://{host}:{port}"


def _host_port(text: str, original: Any) -> tuple[str, int]:
    """host:port with the port required: "a:80" and "a" would otherwise be two peers."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port with a port from 1 to 65535, got {original!r}")
    if not (_HOSTNAME.fullmatch(host) or _IPV6.fullmatch(host)):
        raise ValueError(f"expected a host name or address before :{port}, got {original!r}")
    return host.lower().rstrip("."), int(port)


def peer_urls(value: Any) -> tuple[str, ...]:
    """A TOML list, or from the environment a comma-separated string; "" is no peers."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"expected a list of base URLs, got {value!r}")
    urls = tuple(peer_url(item) for item in items if not isinstance(item, str) or item.strip())
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ValueError(f"each peer once, repeated: {', '.join(repeated)}")
    return urls


def optional_peer_url(value: Any) -> str | None:
    return None if optional_str(value) is None else peer_url(value)


def peers_dns(value: Any) -> str | None:
    """host:port of a headless Service; its A/AAAA records are the peers."""
    text = optional_str(value)
    if text is None:
        return None
    if "://" in text:
        raise ValueError(f"expected host:port (a DNS name, no scheme), got {text!r}")
    host, port = _host_port(text, value)
    if _IPV6.fullmatch(host):
        raise ValueError(f"expected a DNS name to resolve, got the address {text!r}")
    return f"{host}:{port}"


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def cluster_problems(cluster: ClusterConfig) -> list[str]:
    """What is wrong across keys: two sources of peers, or a self that is not a peer."""
    problems = []
    if cluster.peers and cluster.peers_dns is not None:
        problems.append("cluster.peers, cluster.peers_dns: set one of them, not both")
    elif (
        cluster.member
        and cluster.peers
        and cluster.self_url is not None
        and cluster.self_url not in cluster.peers
    ):
        problems.append(
            f"cluster.self: {cluster.self_url!r} is not among cluster.peers; a member must be "
            "one of the peers, or each replica would rank owners over a different set"
        )
    return problems
