"""`mirror warm` against a live mirror: exit status, progress and summary, refusals."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirror.cli.warm import run_warm
from mirror.config import load_config

from .warm_fakes import WarmRegistry, serve_registry, start_mirror_apps, warm_config

TOKEN = "cli-admin-token"


@dataclass
class Run:
    code: int
    out: str
    err: str


Warm = Callable[..., Awaitable[Run]]


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[WarmRegistry]:
    registry = await serve_registry(aiohttp_server)
    registry.image("team/app", "1.0", ["linux/amd64", "linux/arm64"], (2000, 9000))
    registry.image("team/tool", "2.1", ["linux/amd64"])
    yield registry
    registry.release_all()


@pytest.fixture
def start_mirror(
    aiohttp_server: Any, upstream: WarmRegistry, tmp_path: Path
) -> Callable[..., Awaitable[str]]:
    async def start(admin_token: str | None = None) -> str:
        config = warm_config(tmp_path / "cache", upstream.url, admin_token)
        _, admin = await start_mirror_apps(aiohttp_server, config)
        return str(admin.make_url("")).rstrip("/")  # what --url names: the admin listener

    return start


@pytest.fixture
def warm() -> Warm:
    """The CLI is synchronous: it runs in a thread while the loop serves the mirror."""

    async def run(
        url: str,
        images: list[str],
        platforms: list[str] | None = None,
        file: Path | None = None,
        token: str | None = None,
        tty: bool = False,
    ) -> Run:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(
            run_warm, url, images, platforms or [], file, token, 0.02,
            stdout=out, stderr=err, tty=tty,
        )  # fmt: skip
        return Run(code, out.getvalue(), err.getvalue())

    return run


def rows(summary: str) -> dict[str, list[str]]:
    """The summary table, by image."""
    lines = summary.splitlines()
    assert lines[0].split()[:3] == ["IMAGE", "STATE", "PLATFORMS"]
    end = next(n for n, line in enumerate(lines) if " image(s): " in line)
    return {line.split()[0]: line.split() for line in lines[1:end]}


async def test_warming_images_from_arguments_and_a_file(
    start_mirror: Callable[..., Awaitable[str]], warm: Warm, tmp_path: Path
) -> None:
    url = await start_mirror()
    listing = tmp_path / "images.txt"
    listing.write_text("# for the scale-out\nteam/tool:2.1\n\n  fake.test/team/app:1.0  # dup\n")

    run = await warm(url, ["team/app:1.0"], ["linux/amd64", "linux/arm64"], listing)

    assert run.code == 0, run.err
    table = rows(run.out)
    assert table["team/app:1.0"][1:4] == ["done", "linux/amd64,linux/arm64", "6/6"]
    assert table["team/tool:2.1"][1:4] == ["done", "linux/amd64", "2/2"]
    assert "fake.test/team/app:1.0" not in table  # the same image as team/app:1.0
    summary = run.out.splitlines()
    assert summary[-2].startswith("2 image(s): 2 done, 0 failed;")
    assert (
        summary[-1] == "warning: team/tool:2.1: not in the index: linux/arm64 (it has: linux/amd64)"
    )
    assert "job " in run.err and "2 image(s) queued" in run.err
    assert "done   team/app:1.0: 6 blobs" in run.err  # one line per image when not a terminal
    assert "\x1b[" not in run.err


async def test_a_failed_image_makes_the_exit_status_non_zero(
    start_mirror: Callable[..., Awaitable[str]], warm: Warm
) -> None:
    url = await start_mirror()

    run = await warm(url, ["team/tool:2.1", "team/missing:1.0"])

    assert run.code == 1
    table = rows(run.out)
    assert table["team/tool:2.1"][1] == "done"
    missing = table["team/missing:1.0"]
    assert missing[1] == "failed" and "MANIFEST_UNKNOWN:" in missing
    assert run.out.splitlines()[-1].startswith("2 image(s): 1 done, 1 failed;")
    assert "failed team/missing:1.0: manifest 1.0: MANIFEST_UNKNOWN" in run.err


@pytest.mark.parametrize("tty", [False, True], ids=["log", "terminal"])
async def test_a_platform_missing_from_an_index_is_a_visible_warning(
    start_mirror: Callable[..., Awaitable[str]], warm: Warm, tty: bool
) -> None:
    url = await start_mirror()

    run = await warm(
        url, ["team/app:1.0", "team/tool:2.1"], ["linux/arm64", "linux/s390x"], tty=tty
    )

    assert run.code == 1  # team/tool has neither platform
    table = rows(run.out)
    assert table["team/app:1.0"][1:3] == ["done", "linux/arm64"]
    assert "see warning below" in " ".join(table["team/app:1.0"])
    assert table["team/tool:2.1"][1] == "failed"
    lines = run.out.splitlines()
    assert lines[-2].startswith("2 image(s): 1 done, 1 failed;")
    assert lines[-2].endswith("; 1 with warnings")
    warning = (
        "warning: team/app:1.0: not in the index: linux/s390x (it has: linux/amd64, linux/arm64)"
    )
    assert lines[-1] == warning
    assert "the index has no manifest for linux/arm64, linux/s390x (it has: linux/amd64)" in (
        run.out
    )
    if not tty:
        assert warning in run.err.splitlines()  # as the image finishes, too


def _largest_layer(upstream: WarmRegistry, name: str, tag: str, platform: str) -> str:
    index = json.loads(upstream.manifests[upstream.tags[(name, tag)]][0])
    [entry] = [
        e for e in index["manifests"]
        if "/".join((e["platform"]["os"], e["platform"]["architecture"])) == platform
    ]  # fmt: skip
    manifest = json.loads(upstream.manifests[entry["digest"]][0])
    return str(max(manifest["layers"], key=lambda layer: layer["size"])["digest"])


async def test_a_terminal_gets_live_progress_bars(
    start_mirror: Callable[..., Awaitable[str]], upstream: WarmRegistry
) -> None:
    url = await start_mirror()
    # The origin sends half of team/app's big layer, then stalls until the test saw that.
    held = upstream.hold(_largest_layer(upstream, "team/app", "1.0", "linux/amd64"))
    err = io.StringIO()
    run = asyncio.create_task(
        asyncio.to_thread(
            run_warm, url, ["team/app:1.0", "team/tool:2.1"], [], None, None, 0.02,
            stdout=io.StringIO(), stderr=err, tty=True,
        )
    )  # fmt: skip
    await asyncio.wait_for(held.reached.wait(), 10)

    partial = re.compile(r"team/app:1\.0 +\[#+-+\] +([0-9]+)% .* fetching")
    deadline = time.monotonic() + 10
    while not (seen := partial.search(err.getvalue())):  # a frame drawn mid-transfer
        assert time.monotonic() < deadline and not run.done(), err.getvalue()
        await asyncio.sleep(0.01)
    held.release()
    code = await run

    assert code == 0
    assert 0 < int(seen.group(1)) < 100
    frames = err.getvalue().split("\x1b[J")
    assert len(frames) >= 3 and "\x1b[2K" in frames[0]  # lines redrawn in place
    final = frames[-2]  # the last frame drawn
    assert "team/app:1.0" in final and "team/tool:2.1" in final
    assert re.search(r"team/app:1.0 +\[#+\] 100% .* done", final)
    assert re.search(r"team/tool:2.1 +\[#+\] 100% ", final)
    assert "2/2 images" in final.splitlines()[-1] and "total" in final.splitlines()[-1]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["ghcr.io/org/app:1"], "400 BAD_REQUEST: images[0]: 'ghcr.io/org/app:1': registry"),
        (["Team/App"], "400 BAD_REQUEST: images[0]:"),
        ([], "no images given"),
    ],
    ids=["unknown-registry", "bad-reference", "nothing"],
)
async def test_refused_jobs_exit_2_with_the_mirrors_reason(
    start_mirror: Callable[..., Awaitable[str]], warm: Warm, images: list[str], message: str
) -> None:
    url = await start_mirror()

    run = await warm(url, images)

    assert run.code == 2
    assert message in run.err
    assert run.out == ""


async def test_the_admin_token(start_mirror: Callable[..., Awaitable[str]], warm: Warm) -> None:
    url = await start_mirror(admin_token=TOKEN)

    without = await warm(url, ["team/tool:2.1"])
    wrong = await warm(url, ["team/tool:2.1"], token="nope")
    right = await warm(url, ["team/tool:2.1"], token=TOKEN)

    assert without.code == wrong.code == 2
    assert "401 UNAUTHORIZED" in without.err and "401 UNAUTHORIZED" in wrong.err
    assert right.code == 0, right.err
    assert TOKEN not in right.out + right.err


async def test_the_command_reads_the_servers_own_token_variable(
    start_mirror: Callable[..., Awaitable[str]],
) -> None:
    """One environment serves both `mirror serve` and `mirror warm` (kubectl exec into the pod):
    the CLI takes the token from MIRROR_SERVER_ADMIN_TOKEN, the variable the server reads."""
    url = await start_mirror(admin_token=TOKEN)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    environ["MIRROR_SERVER_ADMIN_TOKEN"] = TOKEN
    assert load_config(environ).server.admin_token == TOKEN  # the server starts with it

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "warm", "--url", url, "team/tool:2.1",
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()

    assert proc.returncode == 0, err.decode()
    assert rows(out.decode())["team/tool:2.1"][1] == "done"


async def test_an_unreachable_mirror_exits_2(warm: Warm) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    run = await warm(f"http://127.0.0.1:{port}", ["team/tool:2.1"])

    assert run.code == 2
    assert "cannot reach http://127.0.0.1:" in run.err
