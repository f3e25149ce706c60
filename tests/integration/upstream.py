"""The upstream under test: Debian's Distribution registry behind the token-auth proxy."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import HarnessError, Process, answers, free_port, http_request, require_binary

AUTHPROXY = Path(__file__).with_name("authproxy.py")

REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: integration-tests-only
"""


@dataclass(frozen=True)
class RequestRecord:
    """One request the upstream saw from outside (the mirror, or a client in harness tests)."""

    method: str
    kind: str  # ping | token | manifest_tag | manifest_digest | blob | tags | other
    repository: str | None
    path: str
    query: str
    range: str | None
    status: int | None
    sent: int = 0  # body bytes the proxy wrote for it

    def __str__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.method} {self.path}{query} -> {self.status}"


class Upstream:
    """Registry (plain, for seeding) + authproxy (what the mirror talks to) + control API.

    `host` is the registry name the mirror is configured with; `stop()`/`start()` take only
    the proxy away, so the mirror sees connection refused while the stored images survive.
    """

    def __init__(self, workdir: Path, username: str = "puller", password: str = "pullpass"):
        self.workdir = workdir
        self.registry_bin = require_binary("docker-registry", "registry")
        self.registry_port = free_port()
        self.port = free_port()
        self.control_port = free_port()
        self.username = username
        self.password = password
        config = workdir / "registry.yml"
        config.write_text(
            REGISTRY_CONFIG.format(root=workdir / "storage", addr=f"127.0.0.1:{self.registry_port}")
        )
        self.registry = Process(
            "docker-registry", [self.registry_bin, "serve", str(config)], workdir / "registry.log"
        )
        self.proxy = Process(
            "authproxy",
            [
                sys.executable,
                str(AUTHPROXY),
                "--listen",
                self.host,
                "--control",
                f"127.0.0.1:{self.control_port}",
                "--backend",
                f"http://{self.registry_host}",
                "--user",
                f"{username}:{password}",
                "--private",
                "private/",
            ],
            workdir / "authproxy.log",
        )

    @property
    def host(self) -> str:
        """host:port of the authenticated front: the registry name and URL the mirror uses."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def registry_host(self) -> str:
        """The registry itself without auth, for seeding and for reading back what is stored."""
        return f"127.0.0.1:{self.registry_port}"

    def start(self) -> None:
        if not self.registry.running():
            self.registry.start()
            self.registry.wait_ready(lambda: answers(self.registry_host, "/v2/"))
        if not self.proxy.running():
            self.proxy.start()
            # Probe the control port (opened after the public one), so the request log
            # starts empty instead of with the probe's own requests.
            control = f"127.0.0.1:{self.control_port}"
            self.proxy.wait_ready(lambda: answers(control, "/requests"))

    def stop(self) -> None:
        """Upstream outage: the public port refuses connections (the request log is lost)."""
        self.proxy.stop()

    def close(self) -> None:
        self.proxy.stop()
        self.registry.stop()

    # ----- control API -----------------------------------------------------------------
    def _control(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = [("Content-Type", "application/json")] if data is not None else []
        resp = http_request(method, f"127.0.0.1:{self.control_port}", path, headers, data)
        if resp.status != 200:
            raise HarnessError(f"authproxy control {method} {path}: {resp.status} {resp.body!r}")
        return json.loads(resp.body)

    def requests(self) -> list[RequestRecord]:
        """Every public request since the last reset, in arrival order."""
        return [
            RequestRecord(
                r["method"],
                r["kind"],
                r["repository"],
                r["path"],
                r["query"],
                r["range"],
                r["status"],
                r.get("sent", 0),
            )
            for r in self._control("GET", "/requests")
        ]

    def counts(self, challenges: bool = False) -> Counter[tuple[str, str]]:
        """(method, kind) -> number of requests, e.g. counts()[("GET", "blob")].

        401 challenges are left out unless asked for: clients and the mirror send a request
        once without a token, and whether they do depends on their token caching, not on
        how much they download.
        """
        return Counter((r.method, r.kind) for r in self.requests() if challenges or r.status != 401)

    def blob_bytes(self) -> int:
        """Blob body bytes sent since the last reset: what crossed from the origin."""
        return sum(r.sent for r in self.requests() if r.kind == "blob" and r.method == "GET")

    def reset(self) -> None:
        self._control("POST", "/reset")

    def set_faults(self, *faults: dict[str, Any]) -> None:
        """Install fault rules (fields of authproxy.Fault); replaces earlier ones."""
        self._control("PUT", "/faults", list(faults))

    def clear_faults(self) -> None:
        self._control("DELETE", "/faults")

    def forget_tokens(self) -> None:
        """Invalidate every issued token, so clients must go through the challenge again."""
        self._control("POST", "/forget-tokens")

    def log_sources(self) -> dict[str, Path]:
        return {"docker-registry": self.registry.log_path, "authproxy": self.proxy.log_path}
