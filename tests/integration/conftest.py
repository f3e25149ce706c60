"""Fixtures for real-component tests: upstream registry with token auth, seeded images,
the mirror as a process, containerd and skopeo; logs of every process shown on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .clients import Containerd, Skopeo
from .images import Catalog, seed
from .mirror_proc import Mirror, MirrorFactory, MirrorSettings, RegistryEntry
from .procs import DeadPort
from .upstream import Upstream

LOGBOOK = pytest.StashKey["LogBook"]()


class LogBook:
    """Log files of running processes, and where each stood when the current test began.

    Session-scoped processes log for many tests; a failure report shows only what they
    wrote during the failing test.
    """

    def __init__(self) -> None:
        self.sources: dict[str, Path] = {}
        self.offsets: dict[str, int] = {}

    def add(self, name: str, path: Path, from_start: bool = False) -> None:
        self.sources[name] = path
        self.offsets[name] = 0 if from_start else _size(path)

    def remove(self, name: str) -> None:
        self.sources.pop(name, None)
        self.offsets.pop(name, None)

    def mark(self) -> None:
        self.offsets = {name: _size(path) for name, path in self.sources.items()}

    def since_mark(self, limit: int = 30_000) -> list[tuple[str, str]]:
        sections = []
        for name, path in self.sources.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(name, 0))
                    data = f.read()
            except OSError:
                continue
            if data:
                text = data.decode(errors="replace")
                if len(text) > limit:
                    text = f"[... {len(text) - limit} chars cut ...]\n" + text[-limit:]
                sections.append((name, text))
        return sections


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    book = item.stash.get(LOGBOOK, None)
    if book is not None and report.failed:
        for name, text in book.since_mark():
            report.sections.append((f"log of {name} ({report.when})", text))
    return report


@pytest.fixture(scope="session")
def logbook() -> LogBook:
    return LogBook()


@pytest.fixture(autouse=True)
def _attach_logs(request: pytest.FixtureRequest, logbook: LogBook) -> None:
    logbook.mark()
    request.node.stash[LOGBOOK] = logbook


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory, logbook: LogBook) -> Iterator[Upstream]:
    """Distribution registry behind bearer-token auth; see upstream.Upstream."""
    up = Upstream(tmp_path_factory.mktemp("upstream"))
    for name, path in up.log_sources().items():
        logbook.add(name, path)
    try:
        up.start()
        yield up
    finally:
        up.close()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream: Upstream) -> None:
    """Every test starts with the upstream up, without faults, and with an empty log."""
    upstream.start()
    upstream.clear_faults()
    upstream.reset()


@pytest.fixture(scope="session")
def catalog(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The seeded images as the registry stores them (digests, raw manifests, blobs)."""
    return seed(upstream.registry_host, tmp_path_factory.mktemp("seed"))


@pytest.fixture(scope="session")
def dead_port() -> Iterator[DeadPort]:
    """Where client configs send their fallback: refuses connections all session long."""
    port = DeadPort()
    yield port
    port.close()


@pytest.fixture(scope="session")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, logbook: LogBook, dead_port: DeadPort
) -> Iterator[Containerd]:
    # A short path: the socket name must fit in sun_path (108 bytes).
    daemon = Containerd(tmp_path_factory.mktemp("ctd"), dead_port)
    logbook.add("containerd", daemon.process.log_path)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory: pytest.TempPathFactory, dead_port: DeadPort) -> Skopeo:
    return Skopeo(tmp_path_factory.mktemp("skopeo"), dead_port)


@pytest.fixture
def mirror_factory(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, logbook: LogBook
) -> Iterator[MirrorFactory]:
    """Start mirrors; each is stopped (SIGTERM) at teardown.

    By default the mirror knows the upstream under two names, its host:port and docker.io,
    and uses host:port as the default registry for root-path requests. Keyword arguments
    named section__key set any other setting: upstream__header_timeout="2s".
    """
    started: list[tuple[str, Mirror]] = []

    def factory(
        registries: dict[str, RegistryEntry] | None = None,
        default_registry: str | None = None,
        tag_ttl: str = "5m",
        env: dict[str, str] | None = None,
        port: int | None = None,
        **extra: Any,
    ) -> Mirror:
        if registries is None:
            registries = {
                upstream.host: RegistryEntry(upstream.url),
                "docker.io": RegistryEntry(upstream.url),
            }
        settings = MirrorSettings(
            registries=registries,
            default_registry=default_registry or upstream.host,
            tag_ttl=tag_ttl,
            extra={k.replace("__", "."): v for k, v in extra.items()},
            env=env or {},
        )
        mirror = Mirror(tmp_path_factory.mktemp("mirror"), settings, port)
        name = "mirror" if not started else f"mirror #{len(started) + 1}"
        logbook.add(name, mirror.process.log_path, from_start=True)
        started.append((name, mirror))
        mirror.start()
        return mirror

    yield factory
    for name, mirror in started:
        mirror.stop()
        logbook.remove(name)


@pytest.fixture
def mirror(mirror_factory: MirrorFactory) -> Mirror:
    """A mirror with the default settings and an empty cache."""
    return mirror_factory()
