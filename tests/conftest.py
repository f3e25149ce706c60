"""What every tier shares: one moto server (ECR and S3 over real HTTP) per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from component.moto import MotoServer


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto process for the session (it takes about half a second to start)."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.close()
