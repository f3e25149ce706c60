"""containerd `hosts.toml` files that point each registry at this mirror, falling back to origin.

containerd (1.5+) reads `<config_path>/<namespace>/hosts.toml`, where the namespace is the
registry host as written in the image reference. For a host with a port it tries, in order:

    <config_path>/
      myregistry.io_5000_/hosts.toml    first; the only form Windows allows
      myregistry.io:5000/hosts.toml     then the literal host:port
      _default/hosts.toml               last, for any registry without its own directory (1.7+)

Hosts listed under `[host."..."]` are tried in order; `server` is the fallback after them all,
and without a `server` line containerd falls back to `https://<registry>` itself.

A host's `dial_timeout` (a Go duration, "1s") bounds its TCP connect: containerd 2.1 and later
read it, older ones (1.6, 1.7) ignore the key and keep their own 30 s. A hosts.toml this
command did not write is kept beside the new one as `hosts.toml.orig` (`.orig.1`, ... when
that name is taken by other bytes): the node's previous setup can always be put back.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, TextIO
from urllib.parse import urlsplit

from mirror.config import DEFAULT_REGISTRIES, RegistryConfig

DEFAULT_NAMESPACE = "_default"
# The first line of every file this command writes: a file without it is someone else's.
MARKER = "# Written by `mirror containerd-config`."
BACKUP_SUFFIX = ".orig"

# A host name or IPv4 address with an optional port, or a bracketed IPv6 literal. Anything
# else is refused because the name becomes a directory: "..", "a/b" or "" must never get there.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")
# Printable ASCII minus the characters that would need escaping inside a TOML basic string.
_SAFE_URL = re.compile(r"[\x21-\x7e]+")


def _check_registry(registry: str) -> None:
    if registry != DEFAULT_NAMESPACE and not _REGISTRY.fullmatch(registry):
        raise ValueError(f"not a registry host[:port]: {registry!r}")


def _check_url(url: str, what: str) -> str:
    """The URL without a trailing slash, or ValueError if containerd could not use it."""
    parts = urlsplit(url)
    if (
        not _SAFE_URL.fullmatch(url)
        or '"' in url
        or "\\" in url
        or parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"{what} must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def fallback_origins(registries: Mapping[str, RegistryConfig]) -> dict[str, str]:
    """registry -> the origin containerd falls back to when the mirror cannot answer; "" for
    none, which leaves containerd its own default, https://<registry>.

    A `mirror = true` url is another mirror (the regional tier), not the origin: falling back
    to it would send a node whose mirror chain is failing down that same chain again.
    """
    return {
        name: DEFAULT_REGISTRIES.get(name, "" if registry.is_mirror else registry.url)
        for name, registry in registries.items()
    }


def hosts_dir_candidates(registry: str) -> tuple[str, ...]:
    """Directory names containerd tries for `registry`, in its lookup order."""
    _check_registry(registry)
    if registry == DEFAULT_NAMESPACE:
        return (DEFAULT_NAMESPACE,)
    underscored = hosts_dir_name(registry)
    names = (underscored, registry) if underscored != registry else (registry,)
    return (*names, DEFAULT_NAMESPACE)


def hosts_dir_name(registry: str) -> str:
    """The directory to write for `registry`: "docker.io", "127.0.0.1_5000_", "_default".

    A port is written as `_<port>_` rather than `:<port>`: containerd tries that form first,
    so it wins over any stale `host:port` directory, and it is safe in every filesystem,
    volume name and archive that dislikes colons.
    """
    _check_registry(registry)
    host, sep, port = registry.rpartition(":")
    # "[::1]" splits inside the brackets, but there "1]" is not digits: only ":digits" is a port.
    if sep and host and port.isdigit():
        return f"{host}_{port}_"
    return registry


def go_duration(seconds: float) -> str:
    """A duration as Go's time.ParseDuration reads it: 1.0 -> "1s", 0.25 -> "250ms"."""
    if not math.isfinite(seconds) or seconds < 0.001:
        raise ValueError(f"dial timeout must be at least 1ms, got {seconds!r}s")
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def render_hosts_toml(
    registry: str,
    mirror_url: str,
    origin_url: str | None,
    *,
    override_path: bool = False,
    skip_verify: bool = False,
    dial_timeout: float | None = None,
) -> str:
    """hosts.toml text for `registry`: try the mirror first, then `origin_url` (if given).

    With `override_path` the mirror is addressed as `<mirror_url>/v2/<registry>`, so the path
    names the registry even for clients that drop `?ns=`. `skip_verify` only applies to an
    https mirror; a plain http mirror has no certificate to check. `dial_timeout` (seconds)
    bounds the connect to the mirror, so a node whose mirror is down reaches the fallback
    quickly; unset, containerd's own default applies.
    """
    _check_registry(registry)
    mirror = _check_url(mirror_url, "mirror URL")
    if urlsplit(mirror).path:
        # containerd appends /v2/... to a host's path: /prefix/v2/<name> is nothing the
        # mirror serves (override_path below is the way to put a registry in the path).
        raise ValueError(
            f"mirror URL must be the mirror's root, scheme://host[:port] without a path, "
            f"got {mirror_url!r}: containerd would ask for {mirror}/v2/..."
        )
    fallback = (
        "the server below"
        if origin_url
        else "the registry named in the image reference"
        if registry == DEFAULT_NAMESPACE
        else f"{registry} itself (containerd's default)"
    )
    lines = [
        f"{MARKER} Pull through the mirror; if it cannot answer,",
        f"# containerd falls back to {fallback}.",
        "# Rewritten by every run of the command: edits here are lost.",
    ]
    if origin_url:
        lines.append(f'server = "{_check_url(origin_url, "origin URL")}"')
    if override_path:
        if registry == DEFAULT_NAMESPACE:
            raise ValueError("override_path needs a named registry, not _default")
        mirror = f"{mirror}/v2/{registry}"
    lines += ["", f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]']
    if override_path:
        lines.append("  override_path = true")
    if skip_verify and mirror.startswith("https://"):
        lines.append("  skip_verify = true")
    if dial_timeout is not None:
        lines.append(f'  dial_timeout = "{go_duration(dial_timeout)}"')
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` in one step so containerd (which rereads on every pull) never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hosts.toml.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; the files we write hold no secrets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Written(NamedTuple):
    path: Path
    backup: Path | None  # where the file it replaced was kept, if that was not ours


def _keep_foreign(path: Path) -> Path | None:
    """Copy a hosts.toml this command did not write to a free `.orig` name (same mode); None
    when there is none, it is ours, or a backup with the same bytes already exists."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return None
    if data.startswith(MARKER.encode()):
        return None
    for n in range(1000):
        backup = path.with_name(path.name + BACKUP_SUFFIX + (f".{n}" if n else ""))
        try:
            if backup.read_bytes() == data:
                return None  # kept by an earlier run: the init container runs on every start
        except FileNotFoundError:
            _write_atomic(backup, data, mode)
            return backup
    raise OSError(f"no free backup name for {path}")


def write_hosts_dirs(
    out_dir: Path,
    mirror_url: str,
    registries: Mapping[str, str],
    *,
    override_path: bool = False,
    skip_verify: bool = False,
    dial_timeout: float | None = None,
) -> list[Written]:
    """Write `<out_dir>/<hosts_dir_name(registry)>/hosts.toml` for each registry -> origin URL,
    keeping any such file written by someone else as a backup first.

    Every file is rendered before any is written, so bad input leaves the directory untouched.
    An empty origin omits `server`, leaving containerd to use the registry's own host.
    """
    rendered = [
        (
            out_dir / hosts_dir_name(registry) / "hosts.toml",
            render_hosts_toml(
                registry,
                mirror_url,
                origin or None,
                override_path=override_path,
                skip_verify=skip_verify,
                dial_timeout=dial_timeout,
            ),
        )
        for registry, origin in registries.items()
    ]
    written = []
    for path, text in rendered:
        backup = _keep_foreign(path)
        _write_atomic(path, text.encode())
        written.append(Written(path, backup))
    return written


def run_containerd_config(
    args_mirror: str,
    registries: list[str] | None,
    out: Path,
    origins: Mapping[str, str],
    *,
    dial_timeout: float | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """CLI body: write hosts.toml for `registries` (all of `origins` if None); exit status.

    Only registries the mirror is configured for are accepted (plus `_default`): a hosts.toml
    for any other would send pulls to a mirror that must refuse them.
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    names = sorted(origins) if registries is None else registries
    unknown = [n for n in names if n not in origins and n != DEFAULT_NAMESPACE]
    if unknown:
        print(f"mirror: not configured registries: {', '.join(unknown)}", file=stderr)
        return 2
    try:
        written = write_hosts_dirs(
            out, args_mirror, {n: origins.get(n, "") for n in names}, dial_timeout=dial_timeout
        )
    except ValueError as e:
        print(f"mirror: {e}", file=stderr)
        return 2
    except OSError as e:
        print(f"mirror: cannot write under {out}: {e}", file=stderr)
        return 1
    for path, backup in written:
        if backup is not None:
            print(f"kept {path} as {backup}", file=stdout)
        print(f"wrote {path}", file=stdout)
    return 0
