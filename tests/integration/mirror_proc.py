"""The mirror under test as a real process: `python -m mirror serve --config <toml>`."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import Process, answers, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# To run the suite against another implementation (a stand-in, an older build), set e.g.
# INTEGRATION_MIRROR_CMD="python /path/to/other.py serve"; `--config <file>` is appended.
COMMAND_ENV = "INTEGRATION_MIRROR_CMD"


def mirror_command() -> list[str]:
    override = os.environ.get(COMMAND_ENV)
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "mirror", "serve"]


def mirror_env() -> dict[str, str]:
    env = dict(os.environ)
    # Run the working tree, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # MIRROR_* variables from the caller's shell would override the file: drop them.
    return {k: v for k, v in env.items() if not k.startswith("MIRROR_")}


def mirror_cli(
    *args: str, timeout: float = 30.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m mirror <args>` (warm, cache, containerd-config) from the working tree to
    completion; the exit status is the caller's to check (some tests expect a failure)."""
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=mirror_env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class RegistryEntry:
    url: str
    username: str | None = None
    password: str | None = None
    aws_region: str | None = None  # Amazon ECR: credentials from GetAuthorizationToken
    aws_endpoint_url: str | None = None


@dataclass(frozen=True)
class MirrorSettings:
    """What a test varies; everything else is the mirror's default."""

    registries: dict[str, RegistryEntry]
    default_registry: str | None = None
    tag_ttl: str = "5m"
    # Extra "section.key" -> value pairs, e.g. {"upstream.header_timeout": "2s"}.
    extra: dict[str, Any] = field(default_factory=dict)
    # Added to the process environment (AWS_* keys for ECR; never MIRROR_*, which would
    # override the file).
    env: dict[str, str] = field(default_factory=dict)


def _toml_value(value: Any) -> str:
    # JSON strings, numbers and booleans are valid TOML for the simple values used here.
    return json.dumps(value)


def render_config(settings: MirrorSettings, listen: str, cache_dir: Path, admin_listen: str) -> str:
    sections: dict[str, dict[str, Any]] = {
        "server": {"listen": listen, "admin_listen": admin_listen},
        "cache": {"dir": str(cache_dir), "tag_ttl": settings.tag_ttl},
    }
    for dotted, value in settings.extra.items():
        section, _, key = dotted.partition(".")
        sections.setdefault(section, {})[key] = value
    lines = []
    if settings.default_registry is not None:
        lines.append(f"default_registry = {_toml_value(settings.default_registry)}")
    for section, values in sections.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for name, entry in settings.registries.items():
        lines.append(f"\n[registries.{_toml_value(name)}]")
        lines.append(f"url = {_toml_value(entry.url)}")
        if entry.username is not None:
            lines.append(f"username = {_toml_value(entry.username)}")
        if entry.password is not None:
            lines.append(f"password = {_toml_value(entry.password)}")
        for key in ("aws_region", "aws_endpoint_url"):
            if getattr(entry, key) is not None:
                lines.append(f"{key} = {_toml_value(getattr(entry, key))}")
    return "\n".join(lines) + "\n"


class Mirror:
    """One mirror process with its own port, cache dir, config file and log."""

    def __init__(self, workdir: Path, settings: MirrorSettings, port: int | None = None) -> None:
        """`port`: where to listen (a replica of a fleet, whose peers must know it first)."""
        self.workdir = workdir
        self.settings = settings
        self.port = port or free_port()
        self.admin_port = free_port()  # mirrors run side by side: not the default 5050
        self.cache_dir = workdir / "cache"
        self.config_path = workdir / "mirror.toml"
        self.config_path.write_text(
            render_config(settings, self.host, self.cache_dir, f"127.0.0.1:{self.admin_port}")
        )
        self.process = Process(
            "mirror",
            [*mirror_command(), "--config", str(self.config_path)],
            workdir / "mirror.log",
            env={**mirror_env(), **settings.env},
            cwd=workdir,
        )

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def admin_url(self) -> str:
        """The admin API's own listener (mirror warm --url)."""
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 20.0) -> None:
        self.process.start()
        self.process.wait_ready(lambda: answers(self.host, "/v2/"), timeout=timeout)

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM), the way an orchestrator stops a pod; returns exit code."""
        return self.process.stop(signal.SIGTERM)

    def kill(self) -> None:
        """kill -9: no cleanup at all, for crash-consistency tests."""
        self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (anything else the process printed is skipped)."""
        lines = []
        for raw in self.process.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict):
                lines.append(doc)
        return lines


# The mirror_factory fixture: keyword arguments registries, default_registry, tag_ttl, env, and
# section__key=value for any other setting (upstream__header_timeout="2s").
MirrorFactory = Callable[..., Mirror]
