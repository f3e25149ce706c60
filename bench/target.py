"""The system under test: the mirror as a child process, with a generated TOML config."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from .procs import Process, free_port, http_status, peak_rss_bytes, rss_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
default_registry = "{registry}"
[server]
listen = "127.0.0.1:{port}"
{admin}access_log = false
{server_extra}[cache]
dir = "{cache}"
[upstream]
ranged_streams = {ranged_streams}
chunk_size = "{chunk_size}"
ranged_threshold = "{ranged_threshold}"
[registries."{registry}"]
url = "http://{link}"
{extra}"""


def snapshot_source(dest: Path) -> str:
    """Copy the mirror package to `dest`/mirror and return a digest of its files.

    The mirror is restarted for every cold repetition; running it from a snapshot keeps one
    run on one version of the code even while someone edits mirror/ meanwhile, and the
    digest in the results names exactly what was measured.
    """
    target = dest / "mirror"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(
        REPO_ROOT / "mirror", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    h = hashlib.sha256()
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def config_accepted(source: Path, toml_text: str, scratch: Path) -> tuple[bool, str]:
    """Whether the snapshot's config loader takes `toml_text` (a feature such as [cluster]
    exists there), and its last line of complaint when it does not."""
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"probe-{hashlib.sha256(toml_text.encode()).hexdigest()[:12]}.toml"
    path.write_text(toml_text)
    code = (
        "import sys; from pathlib import Path; from mirror.config.load import load_config; "
        "load_config({}, Path(sys.argv[1]))"
    )
    return _run_in_snapshot(["-c", code, str(path)], source)


def _run_in_snapshot(args: list[str], source: Path) -> tuple[bool, str]:
    """Run `python <args>` with the snapshot first on sys.path: ok, and its last line."""
    try:
        out = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=30, cwd=source
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    text = (out.stdout + out.stderr).strip()
    return out.returncode == 0, text.splitlines()[-1] if text else ""


def mirror_available(source: Path) -> tuple[bool, str]:
    """Whether `python -m mirror serve --help` works (the mirror is written in parallel)."""
    return _run_in_snapshot(["-m", "mirror", "serve", "--help"], source)


class Mirror:
    """One mirror process; `fresh()` restarts it on an empty cache dir for a cold repetition."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        link: str,
        source: Path,
        *,
        ranged_streams: int = 8,
        chunk_size: str = "16MiB",
        ranged_threshold: str = "32MiB",
        registry: str = "bench",
        server_extra: str = "",
        extra: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.source = source  # directory holding the `mirror` package snapshot
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.cache = workdir / "cache"
        self.config_path = workdir / "mirror.toml"
        self.config_text = CONFIG.format(
            port=port,
            # Not the default 5050 (a mirror on this box may have it), unless the caller names one.
            admin=""
            if "admin_listen" in server_extra
            else f'admin_listen = "127.0.0.1:{free_port()}"\n',
            cache=self.cache,
            link=link,
            ranged_streams=ranged_streams,
            chunk_size=chunk_size,
            ranged_threshold=ranged_threshold,
            registry=registry,
            server_extra=server_extra,  # more [server] keys, e.g. admin_listen
            extra=extra,  # more sections, e.g. [cluster] or [s3]
        )
        self.env = env  # extra environment (e.g. the S3 level's credentials)
        self.process: Process | None = None
        self.startup_seconds = 0.0

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)
        argv = [sys.executable, "-m", "mirror", "serve", "--config", str(self.config_path)]
        # cwd first on sys.path: `-m mirror` imports the snapshot, not the live tree.
        env = {**os.environ, **self.env} if self.env else None
        self.process = Process(
            "mirror", argv, self.workdir / "mirror.log", cwd=self.source, env=env
        )
        self.process.start()
        self.startup_seconds = self.process.wait_ready(
            lambda: http_status(self.url + "/v2/") == 200, timeout=30
        )

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.start()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def admin_url(self) -> str:
        """Where the admin API (warm jobs) answers: `server.admin_listen` when the config
        sets one (the admin API's own listener), else the main listener."""
        admin = tomllib.loads(self.config_text).get("server", {}).get("admin_listen")
        return f"http://{admin}" if admin else self.url

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def log_tail(self, max_bytes: int = 4000) -> str:
        return self.process.log_tail(max_bytes) if self.process else ""

    def stop(self) -> int | None:
        if self.process is None:
            return None
        code = self.process.stop()
        self.process = None
        return code
