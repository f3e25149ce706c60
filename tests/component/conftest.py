"""Fixtures: the fake registry, and the mirror (create_app) in front of it via pytest-aiohttp."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.app import create_app
from mirror.config import Config

from .fakeregistry import FakeRegistry
from .harness import Mirror, mirror_config
from .moto import MotoServer

MakeMirror = Callable[..., Awaitable[Mirror]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    registry = FakeRegistry()
    await registry.start()
    try:
        yield registry
    finally:
        await registry.close()


@pytest.fixture
async def make_mirror(aiohttp_client: Any, fake: FakeRegistry, tmp_path: Path) -> MakeMirror:
    """make_mirror(**upstream_overrides) or make_mirror(config=...): a started mirror."""
    count = 0

    async def make(config: Config | None = None, **upstream: Any) -> Mirror:
        nonlocal count
        count += 1
        if config is None:
            config = mirror_config(tmp_path / f"cache{count}", fake.url, **upstream)
        app = create_app(config)
        client = await aiohttp_client(app)
        return Mirror(client, app, config)

    return make


@pytest.fixture
async def mirror(make_mirror: MakeMirror) -> Mirror:
    return await make_mirror()


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    """moto with an empty request log: calls() counts this test's requests only."""
    moto_server.reset()
    return moto_server
