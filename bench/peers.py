"""Peers measured in the same run as the mirror: nginx proxy_cache (cold) and nginx static (warm).

Both are the same Debian nginx binary with generated configs, each in its own prefix dir:
- `proxy_cache`: in front of the link emulator, with `proxy_cache_lock` so N concurrent
  misses cause one upstream fetch (perfect dedup, but the waiters see no byte until the
  fill completes: nginx re-checks the lock every 500 ms and then serves from the cache file).
- `static`: serves the very blob and manifest bytes from disk with sendfile, the ceiling
  for warm serving.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .procs import Process, http_status, require_binary
from .upstream import Image

_COMMON = """\
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    # Keep-alive clients (wrk, containerd) must not be cut every 1000 requests (the default):
    # the mirror never closes idle keep-alive connections on a count either.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
{body}
}}
"""

_PROXY_CACHE = """\
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=blobs:16m max_size=64g
                     inactive=1d use_temp_path=off;
    upstream link {{
        server {link};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location = /_bench_ready {{ return 200 "ok\\n"; }}
        location /v2/ {{
            proxy_pass http://link;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1d;
            # One upstream fetch per key; waiters wait for the whole fill, however long.
            proxy_cache_lock on;
            proxy_cache_lock_timeout 1h;
            proxy_cache_lock_age 1h;
            proxy_read_timeout 600s;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
"""

_STATIC = """\
    # Registries send Docker-Content-Digest; send it here too so headers weigh the same.
    map $uri $bench_digest {{
        default "";
        "~/(?<d>sha256:[0-9a-f]{{64}})$" $d;
{tags}
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {root};
        location = /_bench_ready {{ return 200 "ok\\n"; }}
{exact}
        location ~ ^/v2/.+/manifests/ {{
            types {{ }}
            default_type {manifest_type};
            add_header Docker-Content-Digest $bench_digest;
        }}
        location /v2/ {{
            types {{ }}
            default_type application/octet-stream;
            add_header Docker-Content-Digest $bench_digest;
        }}
    }}
"""


class Nginx:
    """One nginx master process with a generated config under `prefix`."""

    def __init__(self, name: str, prefix: Path, body: str, port: int, workers: int) -> None:
        self.name = name
        self.prefix = prefix
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.binary = require_binary("nginx", "nginx-light")
        self.conf_text = _COMMON.format(
            workers=workers,
            prefix=prefix,
            # As root, nginx would drop workers to `nobody`, who cannot write our tmp dirs.
            user="user root;" if os.geteuid() == 0 else "",
            body=body,
        )
        self.process: Process | None = None

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.conf_text)
        # -e: the error log used before the config is read (the default may be unwritable).
        argv = [
            self.binary,
            "-p",
            str(self.prefix),
            "-e",
            str(self.prefix / "error.log"),
            "-c",
            str(conf),
        ]
        self.process = Process(self.name, argv, self.prefix / "stdout.log").start()
        self.process.wait_ready(lambda: http_status(self.url + "/_bench_ready") == 200)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def proxy_cache(prefix: Path, port: int, link: str, workers: int) -> Nginx:
    """nginx proxy_cache in front of the link; call `fresh()` before each cold repetition."""
    body = _PROXY_CACHE.format(prefix=prefix, port=port, link=link)
    return Nginx("nginx-proxy-cache", prefix, body, port, workers)


def fresh_proxy_cache(nginx: Nginx) -> None:
    """Restart with an empty cache dir: a cold start exactly like a fresh mirror cache dir."""
    nginx.stop()
    shutil.rmtree(nginx.prefix / "cache", ignore_errors=True)
    shutil.rmtree(nginx.prefix / "proxy_temp", ignore_errors=True)
    nginx.start()


def static(prefix: Path, port: int, root: Path, images: list[Image], workers: int) -> Nginx:
    """nginx serving <root>/v2/<name>/{blobs,manifests}/<ref> files with sendfile."""
    tags = "\n".join(
        f'        "/v2/{img.name}/manifests/{img.tag}" "{img.digest}";' for img in images
    )
    types = {img.media_type for img in images}
    if len(types) != 1:
        raise ValueError("static peer serves one manifest media type")
    body = _STATIC.format(port=port, root=root, tags=tags, manifest_type=types.pop(), exact="")
    return Nginx("nginx-static", prefix, body, port, workers)


def static_manifests(
    prefix: Path, port: int, root: Path, manifests: list[tuple[str, str, str, str]], workers: int
) -> Nginx:
    """nginx static for manifests of several media types (an index and its manifest).

    `manifests`: (name, ref, digest, media type); each gets an exact location with its own
    Content-Type, since default_type takes no variables.
    """
    tags = "\n".join(
        f'        "/v2/{name}/manifests/{ref}" "{digest}";'
        for name, ref, digest, _ in manifests
        if ref != digest
    )
    exact = "\n".join(
        f"        location = /v2/{name}/manifests/{ref} {{\n"
        f"            types {{ }}\n            default_type {media_type};\n"
        f"            add_header Docker-Content-Digest $bench_digest;\n        }}"
        for name, ref, _, media_type in manifests
    )
    body = _STATIC.format(
        port=port, root=root, tags=tags, manifest_type="application/octet-stream", exact=exact
    )
    return Nginx("nginx-floor", prefix, body, port, workers)
