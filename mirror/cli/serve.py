"""Running the app: the listening socket, the manifest fast path in front, a clean shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from mirror.app import create_app
from mirror.config import Config
from mirror.http.fastpath import FastPath, FastProtocol
from mirror.keys import manifests_key, metrics_key

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
    aiohttp_protocol = runner.server
    assert aiohttp_protocol is not None
    fast = FastPath(config, app[manifests_key], app[metrics_key])
    if config.server.fast_path:
        factory = lambda: FastProtocol(fast, aiohttp_protocol, loop)  # noqa: E731
    else:
        factory = aiohttp_protocol  # type: ignore[assignment]  # same callable shape
    listener = await loop.create_server(
        factory, config.server.host, config.server.port, backlog=1024, reuse_address=True
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
    flusher = asyncio.create_task(_flush_every_second(fast), name="fast-path metrics")
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        flusher.cancel()
        fast.flush_metrics()
        listener.close()
        for connection in list(fast.connections):
            connection.close()
        await runner.cleanup()


async def _flush_every_second(fast: FastPath) -> None:
    """The fast path counts in plain ints; scrapes flush too, this bounds the lag for others."""
    while True:
        await asyncio.sleep(1.0)
        fast.flush_metrics()


def run_serve(config: Config, log_level: str) -> int:
    """`mirror serve`: JSON logs, then the app on uvloop until a signal."""
    import uvloop

    from mirror.log import configure_logging

    configure_logging(log_level)
    uvloop.run(serve(config))
    return 0
