"""Parsing argv and dispatching to a command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mirror.config import Config, ConfigError, load_config
from mirror.config.values import parse_duration
from mirror.storage.lock import CacheInUse

ADMIN_TOKEN_ENV = "MIRROR_SERVER_ADMIN_TOKEN"  # server.admin_token, as load_config reads it


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the mirror")
    _config_args(serve)
    serve.add_argument("--listen", help="host:port to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--cache-dir", help="cache directory (default ./mirror-cache)")
    serve.add_argument("--log-level", default=os.environ.get("MIRROR_LOG_LEVEL", "info"))

    warm = sub.add_parser("warm", help="pull images into a running mirror's cache ahead of demand")
    warm.add_argument(
        "images", nargs="*", metavar="IMAGE",
        help="image reference: nginx:1.27, ghcr.io/org/app:1.0, quay.io/x/y@sha256:...",
    )  # fmt: skip
    warm.add_argument(
        "--platform", action="append", dest="platforms", default=[], metavar="OS/ARCH[/VARIANT]",
        help="platform to warm (repeatable; default: the mirror's warm.platforms)",
    )  # fmt: skip
    warm.add_argument(
        "--file", type=Path, help="file of image references, one per line (# comments; - is stdin)"
    )
    warm.add_argument(
        "--url", default="http://127.0.0.1:5050",
        help="the mirror's admin listener, server.admin_listen (default %(default)s)",
    )  # fmt: skip
    warm.add_argument(
        "--token", help=f"admin token (default: env {ADMIN_TOKEN_ENV}, the server's own setting)"
    )

    cache = sub.add_parser("cache", help="inspect or trim the cache directory")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    status = cache_sub.add_parser("status", help="print size, entries and oldest access")
    gc = cache_sub.add_parser("gc", help="evict least recently used blobs down to a size")
    gc.add_argument(
        "--target", help="size to evict down to (default: the low watermark of max_size)"
    )
    for p in (status, gc):
        _config_args(p)
        p.add_argument("--cache-dir", help="cache directory (default from config)")

    hosts = sub.add_parser(
        "containerd-config", help="write containerd hosts.toml files that use this mirror"
    )
    hosts.add_argument("--mirror", required=True, help="the mirror's URL, e.g. http://mirror:5000")
    hosts.add_argument(
        "--registry", action="append", dest="registries",
        help="registry to configure (repeatable; default: all configured registries)",
    )  # fmt: skip
    hosts.add_argument("--out", required=True, type=Path, help="containerd's config_path dir")
    hosts.add_argument(
        "--dial-timeout", type=_duration, metavar="DURATION",
        help="connect timeout to the mirror, e.g. 1s, so a node whose mirror is down falls back "
        "quickly (read by containerd 2.1+; default: none written, containerd's 30s)",
    )  # fmt: skip
    _config_args(hosts)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=os.environ.get("MIRROR_CONFIG") or None,
        help="TOML config file (default: built-in defaults; env MIRROR_CONFIG)",
    )  # fmt: skip


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _load(args: argparse.Namespace, overrides: dict[str, object] | None = None) -> Config:
    return load_config(os.environ, args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = _load(args, {"server.listen": args.listen, "cache.dir": args.cache_dir})
            from mirror.cli.serve import run_serve

            return run_serve(config, args.log_level)
        if args.command == "warm":
            from mirror.cli.warm import run_warm

            # The server's own variable, so `kubectl exec <pod> -- mirror warm` needs no flag.
            token = args.token or os.environ.get(ADMIN_TOKEN_ENV) or None
            return run_warm(args.url, args.images, args.platforms, args.file, token)
        if args.command == "cache":
            from mirror.cli.cache import run_cache
            from mirror.log import configure_logging

            # stdout is the command's answer; the janitor's own lines go to stderr.
            configure_logging("warning", sys.stderr)

            config = _load(args, {"cache.dir": args.cache_dir})
            return run_cache(config.cache, args.cache_command, getattr(args, "target", None))
        if args.command == "containerd-config":
            from mirror.cli.containerd import fallback_origins, run_containerd_config

            config = _load(args)
            origins = fallback_origins(config.registries)
            return run_containerd_config(
                args.mirror, args.registries, args.out, origins, dial_timeout=args.dial_timeout
            )
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except CacheInUse as exc:
        print(f"mirror: {exc}: one server per cache directory", file=sys.stderr)
        return 1
    return 2
