"""Framework floor: a bare aiohttp-on-uvloop server answering manifest requests from memory.

Not a target and not the mirror: it shows how many requests per second one Python process
with the mirror's stack can answer at all, so a gap to nginx can be split into what the
framework costs and what the mirror's own code adds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from pathlib import Path

from aiohttp import web

from .procs import Process, http_status


def build_app(root: Path, media_type: str) -> web.Application:
    # /v2/<name>/manifests/<ref> -> (bytes, digest), read once at start.
    manifests: dict[str, tuple[bytes, str]] = {}
    for path in root.glob("v2/**/manifests/*"):
        body = path.read_bytes()
        manifests["/" + str(path.relative_to(root))] = (
            body,
            "sha256:" + hashlib.sha256(body).hexdigest(),
        )

    async def manifest(request: web.Request) -> web.Response:
        found = manifests.get(request.path)
        if found is None:
            raise web.HTTPNotFound()
        body, digest = found
        # aiohttp sends Content-Length and no body for HEAD (routes allow HEAD by default).
        return web.Response(
            body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": digest}
        )

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/_bench_ready", ready)
    app.router.add_get(r"/v2/{name:.+}/manifests/{ref}", manifest)
    return app


class Floor:
    """Harness-side handle: the floor server as a child process."""

    def __init__(
        self, port: int, root: Path, media_type: str, log: Path, max_seconds: float
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = Process(
            "aiohttp-floor",
            [
                sys.executable,
                "-m",
                "bench.floor",
                "--listen",
                f"127.0.0.1:{port}",
                "--root",
                str(root),
                "--media-type",
                media_type,
                "--max-seconds",
                str(max_seconds),
            ],
            log,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(lambda: http_status(self.url + "/_bench_ready") == 200)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--listen", required=True)
    parser.add_argument("--root", type=Path, required=True, help="the nginx static root")
    parser.add_argument("--media-type", required=True)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")

    async def serve() -> None:
        runner = web.AppRunner(build_app(args.root, args.media_type), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, int(port), backlog=1024).start()
        try:
            await asyncio.sleep(args.max_seconds)  # bounded lifetime if the harness vanished
        finally:
            await runner.cleanup()

    import uvloop

    uvloop.run(serve())


if __name__ == "__main__":
    main()
