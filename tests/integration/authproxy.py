"""Docker-Hub-like front for a Distribution registry: bearer-token auth, a request log, faults.

Run as a script (it must not import the test package):

    python authproxy.py --listen 127.0.0.1:P --control 127.0.0.1:C --backend http://127.0.0.1:R

Public port (what the mirror sees as the upstream):
  GET /v2/                         401 `Bearer realm=http://<listen>/token,service=...` without
                                   a token, 200 with any valid one (like registry-1.docker.io)
  /v2/<name>/(manifests|blobs|tags)/...   401 with `scope=repository:<name>:pull` unless the
                                   bearer token grants pull on <name>; then forwarded verbatim
  GET /token?service=&scope=       anonymous tokens for public repositories; repositories under
                                   a --private prefix need Basic credentials (--user u:p)
  anything but GET/HEAD            405 (the upstream is read-only for the mirror)

Control port (for the tests only, so the public log stays exact):
  GET /requests       every public request since the last reset, in order
  POST /reset         clear the log
  PUT /faults         JSON list of fault rules (see Fault); GET shows them; DELETE clears
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from yarl import URL

SERVICE = "registry.test"
TOKEN_TTL = 300
# Hop-by-hop headers are per connection, never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
}
V2_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<what>manifests|blobs|tags)/(?P<ref>[^/]+)$")


def classify(method: str, path: str) -> tuple[str, str | None]:
    """(kind, repository) of a public request: the unit the tests count in."""
    if path == "/token":
        return "token", None
    if path in ("/v2/", "/v2"):
        return "ping", None
    m = V2_PATH.match(path)
    if not m:
        return "other", None
    name, what, ref = m["name"], m["what"], m["ref"]
    if what == "manifests":
        return ("manifest_digest" if ":" in ref else "manifest_tag"), name
    if what == "blobs":
        return "blob", name
    return "tags", name


@dataclass
class Fault:
    """One injected misbehaviour; matches by kind/method/repository/digest, for `times` requests.

    action: "status" (answer `status` with `headers` and an OCI error body),
            "delay" (wait `seconds`, then behave normally),
            "hang" (never answer; the client's timeout must save it),
            "cut" (send headers and `after` bytes of the real body, then close cleanly),
            "corrupt" (flip one byte of the real body, same length),
            "throttle" (send the real body at about `rate` bytes per second).
    """

    action: str = "status"
    kind: str | None = None
    method: str | None = None
    repository: str | None = None
    digest: str | None = None  # the blob or manifest this one path ends with
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    after: int = 0
    rate: float = 0.0  # bytes per second, for "throttle"
    times: int | None = None  # None: forever
    hits: int = 0

    def matches(self, method: str, kind: str, repository: str | None, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (
            (self.kind is None or self.kind == kind)
            and (self.method is None or self.method == method)
            and (self.repository is None or self.repository == repository)
            and (self.digest is None or path.endswith(f"/{self.digest}"))
        )


@dataclass
class Grant:
    repositories: frozenset[str]
    expires: float


class Proxy:
    def __init__(
        self,
        listen: str,
        backend: str,
        users: dict[str, str],
        private_prefixes: tuple[str, ...],
    ) -> None:
        self.listen = listen
        self.backend = backend.rstrip("/")
        self.users = users
        self.private_prefixes = private_prefixes
        self.log: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.tokens: dict[str, Grant] = {}
        self.session: ClientSession | None = None

    # ----- public side -----------------------------------------------------------------
    def challenge(self, repository: str | None) -> web.Response:
        value = f'Bearer realm="http://{self.listen}/token",service="{SERVICE}"'
        if repository is not None:
            value += f',scope="repository:{repository}:pull"'
        body = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        return web.json_response(body, status=401, headers={"WWW-Authenticate": value})

    def granted(self, request: web.Request, repository: str | None) -> bool:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        grant = self.tokens.get(auth[len("Bearer ") :])
        if grant is None or grant.expires < time.time():
            return False
        return repository is None or repository in grant.repositories

    def is_private(self, repository: str) -> bool:
        return any(repository.startswith(p) for p in self.private_prefixes)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind, repository = classify(request.method, request.path)
        entry: dict[str, Any] = {
            "method": request.method,
            "kind": kind,
            "repository": repository,
            "path": request.path,
            "query": request.query_string,
            "range": request.headers.get("Range"),
            "status": None,
            "time": time.time(),
            "sent": 0,  # body bytes written so far: what crossed "the region boundary"
        }
        self.log.append(entry)
        response = await self.dispatch(request, kind, repository, entry)
        entry["status"] = response.status
        return response

    async def dispatch(
        self, request: web.Request, kind: str, repository: str | None, entry: dict[str, Any]
    ) -> web.StreamResponse:
        if kind == "token":
            return self.issue_token(request)
        if request.method not in ("GET", "HEAD"):
            body = {"errors": [{"code": "UNSUPPORTED", "message": "read-only upstream"}]}
            return web.json_response(body, status=405)
        if kind == "other":
            return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)
        if not self.granted(request, repository):
            return self.challenge(repository)
        fault = next(
            (f for f in self.faults if f.matches(request.method, kind, repository, request.path)),
            None,
        )
        if fault is not None:
            fault.hits += 1
            if fault.action == "status":
                body = {
                    "errors": [
                        {
                            "code": "TOOMANYREQUESTS" if fault.status == 429 else "UNAVAILABLE",
                            "message": "injected fault",
                        }
                    ]
                }
                return web.json_response(body, status=fault.status, headers=fault.headers)
            if fault.action == "delay":
                await asyncio.sleep(fault.seconds)
            elif fault.action == "hang":
                await asyncio.sleep(3600)
        return await self.forward(request, fault, entry)

    def issue_token(self, request: web.Request) -> web.Response:
        repositories: set[str] = set()
        user = self.basic_user(request)
        if user == "":
            # Wrong credentials are an error, as on Docker Hub (anonymous is just no header).
            return web.json_response({"details": "incorrect username or password"}, status=401)
        for scope in request.query.getall("scope", []):
            for item in scope.split(" "):
                parts = item.split(":")
                if len(parts) != 3 or parts[0] != "repository" or "pull" not in parts[2]:
                    continue
                name = parts[1]
                if self.is_private(name) and user is None:
                    continue  # like Docker Hub: the token simply lacks the scope
                repositories.add(name)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = Grant(frozenset(repositories), time.time() + TOKEN_TTL)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"token": token, "access_token": token, "expires_in": TOKEN_TTL, "issued_at": issued}
        return web.json_response(body)

    def basic_user(self, request: web.Request) -> str | None:
        """None: anonymous; "": bad credentials; otherwise the user name."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return ""
        if not user and not password:
            return None  # skopeo sends `Basic Og==` when it has nothing
        return user if self.users.get(user) == password else ""

    async def forward(
        self, request: web.Request, fault: Fault | None, entry: dict[str, Any]
    ) -> web.StreamResponse:
        assert self.session is not None
        # A list keeps repeated headers (skopeo sends six Accept lines).
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        # The raw path and query, untouched: re-encoding could change what the registry sees.
        url = URL(self.backend + request.raw_path, encoded=True)
        async with self.session.request(
            request.method,
            url,
            headers=headers,
            allow_redirects=False,
        ) as upstream:
            out_headers = [
                (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
            ]
            response = web.StreamResponse(status=upstream.status)
            for k, v in out_headers:
                response.headers.add(k, v)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            sent = 0
            corrupted = False
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if fault is not None and fault.action == "cut" and sent + len(chunk) >= fault.after:
                    await response.write(chunk[: fault.after - sent])
                    # Close cleanly (FIN) with fewer bytes than announced.
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if fault is not None and fault.action == "corrupt" and not corrupted and chunk:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    corrupted = True
                if fault is not None and fault.action == "throttle" and fault.rate > 0:
                    await asyncio.sleep(len(chunk) / fault.rate)  # before: the last one too
                await response.write(chunk)
                sent += len(chunk)
                entry["sent"] = sent
            await response.write_eof()
            return response

    # ----- control side ----------------------------------------------------------------
    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def reset(self, request: web.Request) -> web.Response:
        self.log.clear()
        return web.json_response({})

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(f) for f in self.faults])

    async def put_faults(self, request: web.Request) -> web.Response:
        self.faults = [Fault(**item) for item in await request.json()]
        return web.json_response([asdict(f) for f in self.faults])

    async def delete_faults(self, request: web.Request) -> web.Response:
        self.faults = []
        return web.json_response([])

    async def forget_tokens(self, request: web.Request) -> web.Response:
        self.tokens.clear()
        return web.json_response({})


async def main(args: argparse.Namespace) -> None:
    users = dict(u.split(":", 1) for u in args.user)
    proxy = Proxy(args.listen, args.backend, users, tuple(args.private))
    # No total timeout: blobs stream for as long as they take; auto_decompress off so bytes
    # pass through exactly as the registry sent them.
    proxy.session = ClientSession(
        connector=TCPConnector(limit=0),
        timeout=ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
    )
    public = web.Application()
    public.router.add_route("*", "/{tail:.*}", proxy.handle)
    control = web.Application()
    control.router.add_get("/requests", proxy.get_requests)
    control.router.add_post("/reset", proxy.reset)
    control.router.add_get("/faults", proxy.get_faults)
    control.router.add_put("/faults", proxy.put_faults)
    control.router.add_delete("/faults", proxy.delete_faults)
    control.router.add_post("/forget-tokens", proxy.forget_tokens)
    runners = []
    for app, where in ((public, args.listen), (control, args.control)):
        # No access log: the request log above is the record, and stdout stays for errors.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = where.rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
        runners.append(runner)
    print(f"authproxy ready on {args.listen} (control {args.control})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await proxy.session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--user", action="append", default=[], help="name:password")
    parser.add_argument("--private", action="append", default=[], help="repository prefix")
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        pass
