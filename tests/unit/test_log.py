"""Every line the mirror prints is one JSON object, whoever logged it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_library_and_mirror_lines_are_all_json() -> None:
    """aiohttp's server errors and botocore's notices go through the standard library: a log
    pipeline that parses JSON must not meet a plain-text line, traceback included."""
    script = """
import logging, structlog
from mirror.log import configure_logging
configure_logging("info")
logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("aiohttp.server").exception("Error handling request")
structlog.get_logger("mirror.app").info("mirror_started", port=5000)
logging.getLogger("aiohttp.access").info("dropped: the mirror writes its own access line")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [
        ("Found credentials in environment variables.", "info"),
        ("Error handling request", "error"),
        ("mirror_started", "info"),
    ]
    assert lines[0]["logger"] == "botocore.credentials"
    assert "ZeroDivisionError" in lines[1]["exception"]
    assert all("timestamp" in e for e in lines)
