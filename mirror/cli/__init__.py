"""The `mirror` command: argv -> config -> logging -> run: serve, warm, cache, containerd-config."""

from mirror.cli.main import ADMIN_TOKEN_ENV, main

__all__ = ["ADMIN_TOKEN_ENV", "main"]
