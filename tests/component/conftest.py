"""Fixtures: the fake registry, and the mirror (create_app) in front of it via pytest-aiohttp."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mirror.app import create_app
from mirror.config import Config

from .fakeregistry import FakeRegistry
from .harness import FakeClock, Mirror, Served, ServedClient, mirror_config
from .moto import MotoServer

MakeMirror = Callable[..., Awaitable[Mirror]]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """@pytest.mark.both_paths: the test runs twice, against the production server with the
    manifest fast path on and with it off. Their answers must be the same."""
    if "fast_path" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_paths"
    ):
        metafunc.parametrize("fast_path", [True, False], ids=["fast_path", "aiohttp"])


@pytest.fixture
def fast_path() -> bool | None:
    """None unless @both_paths: the mirror is then served by aiohttp's TestServer."""
    return None


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    registry = FakeRegistry()
    await registry.start()
    try:
        yield registry
    finally:
        await registry.close()


@pytest.fixture
async def make_mirror(
    aiohttp_client: Any, fake: FakeRegistry, tmp_path: Path, fast_path: bool | None
) -> AsyncIterator[MakeMirror]:
    """make_mirror(**upstream_overrides) or make_mirror(config=...): a started mirror."""
    count = 0
    served: list[ServedClient] = []

    async def make(
        config: Config | None = None, clock: FakeClock | None = None, **upstream: Any
    ) -> Mirror:
        """`clock`: the mirror's time is the test's to move (see FakeClock)."""
        nonlocal count
        count += 1
        if config is None:
            config = mirror_config(tmp_path / f"cache{count}", fake.url, **upstream)
        deps = clock.deps() if clock is not None else None
        if fast_path is not None:
            config = replace(config, server=replace(config.server, fast_path=fast_path))
            server = await Served.start(config, deps=deps)
            served.append(ServedClient(server))
            return Mirror(served[-1], server.app, config)
        app = create_app(config, deps)
        client = await aiohttp_client(app)
        return Mirror(client, app, config)

    yield make
    for client in served:
        await client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def mirror(make_mirror: MakeMirror) -> Mirror:
    return await make_mirror()


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    """moto with an empty request log: calls() counts this test's requests only."""
    moto_server.reset()
    return moto_server
