"""structlog set up for one JSON object per line (stdout for the server)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """`stream`: where lines go (default stdout; a command whose stdout is its answer, like
    `mirror cache gc`, logs to stderr)."""
    stream = stream or sys.stdout
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    # Libraries log through the standard library (aiohttp's server errors, botocore): their
    # lines get the same JSON shape, so a log pipeline never meets a line it cannot parse.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiohttp's own access log would duplicate ours, without the request id.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # botocore's DEBUG lines carry signed request headers and response bodies, ECR's
    # authorization tokens among them: never below INFO, whatever the mirror's level.
    for name in ("botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


_access = structlog.get_logger("mirror.access")


def access_line(
    *,
    method: str,
    path: str,
    ns: str | None,
    route: str,
    registry: str | None,
    status: int,
    sent: int,
    seconds: float,
    cache: str,
    client: str | None,
    user_agent: str | None,
    **extra: object,
) -> None:
    """The one access-log line per request, whichever server path answered it."""
    _access.info(
        "request", method=method, path=path, ns=ns, route=route, registry=registry,
        status=status, bytes=sent, ms=round(seconds * 1000, 2), cache=cache, client=client,
        user_agent=user_agent, **extra,
    )  # fmt: skip
