"""Running the app: the listening socket, the manifest fast path in front, a clean shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from mirror.app import connection_protocol, create_app
from mirror.config import Config

log = structlog.get_logger("mirror.cli.serve")


async def serve(
    config: Config,
    stop: asyncio.Event | None = None,
    bound: Callable[[list[tuple[str, int]]], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or, when given, until `stop` is set), then drain: downloads
    are cancelled and their temp files removed by the app's cleanup, so nothing partial stays
    behind. `bound` is told the listening addresses (port 0 picks a free one)."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()  # runs the app's cleanup_ctx: every service exists from here on
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    listener = await loop.create_server(
        connection_protocol(app, runner.server),
        config.server.host,
        config.server.port,
        backlog=1024,
        reuse_address=True,
    )
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    sockets = [s.getsockname()[:2] for s in listener.sockets]
    if bound is not None:
        bound(sockets)
    addresses = [f"{a[0]}:{a[1]}" for a in sockets]
    log.info("listening", addresses=addresses, fast_path=config.server.fast_path)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        listener.close()
        await runner.cleanup()  # the app's cleanup closes what is still on the fast path


def run_serve(config: Config, log_level: str) -> int:
    """`mirror serve`: JSON logs, then the app on uvloop until a signal."""
    import uvloop

    from mirror.log import configure_logging

    configure_logging(log_level)
    uvloop.run(serve(config))
    return 0
