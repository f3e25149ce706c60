"""Running the app: the listeners (registry API with the fast path in front, and the admin API),
the connection limits, a clean shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack

import structlog
from aiohttp import web

from mirror.app import UPSTREAM_CONNECTIONS, connection_protocol, create_admin_app, create_app
from mirror.config import Config
from mirror.http.accept import Acceptor, listening_sockets
from mirror.http.connections import (
    ClientConnections,
    HeadWatch,
    connection_cap,
    raise_fd_limit,
    serving_reserve,
)
from mirror.http.server import KEEPALIVE_TIMEOUT
from mirror.keys import metrics_key

log = structlog.get_logger("mirror.cli.serve")

Bound = Callable[[list[tuple[str, int]]], None]
BACKLOG = 4096  # the kernel's accept queue; it also caps this at net.core.somaxconn
ADMIN_CONNECTIONS = 64  # operators and their scripts, not a fleet


async def serve(
    config: Config,
    stop: asyncio.Event | None = None,
    bound: Bound | None = None,
    admin_bound: Bound | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or, when given, until `stop` is set), then drain: downloads
    are cancelled and their temp files removed by the app's cleanup, so nothing partial stays
    behind. `bound` and `admin_bound` are told the listening addresses of the registry and the
    admin API (port 0 picks a free one)."""
    server = config.server
    limit = _connection_limit(config)
    app = create_app(config)
    admin = create_admin_app(app)
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5.0,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
        )  # fmt: skip
        await runner.setup()  # runs the app's cleanup_ctx: every service exists from here on
        stack.push_async_callback(runner.cleanup)
        admin_runner = web.AppRunner(
            admin, access_log=None, handle_signals=False, shutdown_timeout=5.0,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
        )  # fmt: skip
        await admin_runner.setup()
        stack.push_async_callback(admin_runner.cleanup)  # first out: before the services go
        metrics = app[metrics_key]
        clients = ClientConnections(limit, server.header_timeout, loop, metrics)
        admin_clients = ClientConnections(ADMIN_CONNECTIONS, server.header_timeout, loop, metrics)
        metrics.watch_connections(clients.__len__, limit)
        for watched in (clients, admin_clients):
            watched.start()
            stack.callback(watched.stop)
        aiohttp_protocol, admin_protocol = runner.server, admin_runner.server
        assert aiohttp_protocol is not None and admin_protocol is not None
        factory = connection_protocol(app, aiohttp_protocol, clients)
        # Not loop.create_server: libuv accepts one connection per loop iteration (Acceptor).
        listener = Acceptor(loop, factory, listening_sockets(server.host, server.port, BACKLOG))
        listener.start()
        stack.callback(listener.close)
        admin_listener = await loop.create_server(
            lambda: HeadWatch(admin_protocol(), admin_clients, admitted=False),
            server.admin_host, server.admin_port, backlog=128, reuse_address=True,
        )  # fmt: skip
        stack.callback(admin_listener.close)
        if stop is None:
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        sockets = [s.getsockname()[:2] for s in listener.sockets]
        admin_sockets = [s.getsockname()[:2] for s in admin_listener.sockets]
        if bound is not None:
            bound(sockets)
        if admin_bound is not None:
            admin_bound(admin_sockets)
        log.info(
            "listening", addresses=[f"{a[0]}:{a[1]}" for a in sockets],
            admin=[f"{a[0]}:{a[1]}" for a in admin_sockets], fast_path=server.fast_path,
            max_connections=limit, header_timeout=server.header_timeout,
        )  # fmt: skip
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            listener.close()
            admin_listener.close()
            # The runners' cleanup (the stack) closes what is still on the fast path.


def _connection_limit(config: Config) -> int:
    """Raise the descriptor limit as far as allowed and fit the connection cap under it."""
    before, soft, hard = raise_fd_limit()
    reserved = serving_reserve(UPSTREAM_CONNECTIONS, config.server.sendfile_threads)
    limit = connection_cap(config.server.max_connections, soft, reserved)
    log.info(
        "descriptor_limit", soft_before=before, soft=soft, hard=hard, reserved=reserved,
        max_connections=limit,
    )  # fmt: skip
    if limit < config.server.max_connections:
        log.warning(
            "max_connections_lowered", configured=config.server.max_connections, allowed=limit,
            hint="the hard RLIMIT_NOFILE is too low for it (ulimit -Hn, or the container's)",
        )  # fmt: skip
    return limit


def run_serve(config: Config, log_level: str) -> int:
    """`mirror serve`: JSON logs, then the app on uvloop until a signal."""
    import uvloop

    from mirror.log import configure_logging

    configure_logging(log_level)
    uvloop.run(serve(config))
    return 0
