"""Config values from text: sizes, durations, addresses, flags and platform lists (pure)."""

from __future__ import annotations

import ipaddress
import math
import re
from decimal import Decimal
from typing import Any

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"": 1, "s": 1, "ms": 0.001, "m": 60, "h": 3600, "d": 86400}
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.ASCII)
_NUMBER_WITH_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: Any) -> int:
    """Bytes from 1048576, "512MiB", "100GB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    m = _NUMBER_WITH_UNIT.fullmatch(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 512MiB or 100GB, got {value!r}")
    # Decimal, not float: exact for any number of bytes, and no overflow to infinity.
    return int(Decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(size: int | float) -> str:
    """The inverse of parse_size for people: 41943040 -> "40.0 MiB", 512 -> "512 B"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def parse_duration(value: Any) -> float:
    """Seconds from 30, 2.5, "500ms", "5m", "7d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _NUMBER_WITH_UNIT.fullmatch(str(value))
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise ValueError(f"expected a duration like 30s, 5m or 7d, got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if math.isnan(seconds) or seconds < 0:
        raise ValueError("duration must not be negative")
    if math.isinf(seconds):
        raise ValueError("duration is too long")  # a timer that never fires, or overflows
    return seconds


def parse_listen(value: Any) -> tuple[str, int]:
    """ "0.0.0.0:5000", "[::1]:5000", ":5000" -> (host, port)."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    # ASCII digits only: str.isdigit() also takes "١٢" (Arabic-Indic), which int() reads as 12.
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def positive_int(value: Any) -> int:
    return _whole_number(value, 1, "must be at least 1")


def non_negative_int(value: Any) -> int:
    return _whole_number(value, 0, "must be 0 or more")


def _whole_number(value: Any, least: int, too_small: str) -> int:
    if isinstance(value, bool):  # TOML's true is an int to Python, never a count to us
        raise ValueError("expected a whole number")
    number = int(value)
    if number < least:
        raise ValueError(too_small)
    return number


def fraction(value: Any) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise ValueError("must be a fraction in (0, 1]")
    return number


def parse_platforms(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    result = tuple(str(p).strip() for p in items if str(p).strip())
    for p in result:
        if p.count("/") not in (1, 2):
            raise ValueError(f"platform {p!r} is not os/arch[/variant]")
    if not result:
        raise ValueError("at least one platform is needed")
    return result


def parse_hosts_or_networks(
    value: Any,
) -> tuple[str | ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """ "cdn.internal, 10.0.0.0/8, fd00::1" (or a list of them) -> host names (lower case) and
    networks (a bare address is a network of one)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    result: list[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            result.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        name = text.lower().removesuffix(".")
        if len(name) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in name.split(".")):
            raise ValueError(f"expected a host name, an address or a CIDR network, got {text!r}")
        if name.replace(".", "").isdigit():  # 127.1, 2130706433: not names, not addresses
            raise ValueError(f"{text!r} is not an address in dotted form")
        result.append(name)
    return tuple(result)


def optional_str(value: Any) -> str | None:
    text = str(value)
    return text or None


def secret(value: Any) -> str:
    """A token: an empty one would read as "no token" and leave what it guards open."""
    text = str(value)
    if not text.strip():
        raise ValueError("must not be empty (leave it unset for none)")
    return text


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere
