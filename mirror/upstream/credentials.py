"""Where a registry's credentials come from: its config, or a service that issues them."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from mirror.config import RegistryConfig


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:  # never let a password reach a log line through a repr
        return f"Credentials(username={self.username!r}, password=***)"


class CredentialSource(Protocol):
    async def get(self, registry: RegistryConfig) -> Credentials | None:
        """What to send to `registry` now; None: go anonymous."""
        ...

    def refused(self, registry: RegistryConfig, creds: Credentials) -> bool:
        """`registry` answered 401 to `creds`. True: the next get() asks the issuer anew, and
        the caller may try once more with what it gives. A source says so at most once in a
        while, so a registry that refuses every pair does not turn each request into a call
        to the issuer."""
        ...


class StaticCredentials:
    """username/password from the config: nothing fresher to offer when they are refused."""

    async def get(self, registry: RegistryConfig) -> Credentials | None:
        if not registry.username:
            return None
        return Credentials(registry.username, registry.password or "")

    def refused(self, registry: RegistryConfig, creds: Credentials) -> bool:
        return False


class CredentialsByRegistry:
    """One source for the registries named in `sources`, `default` for every other."""

    def __init__(self, sources: Mapping[str, CredentialSource], default: CredentialSource):
        self._sources = sources
        self._default = default

    async def get(self, registry: RegistryConfig) -> Credentials | None:
        return await self._sources.get(registry.name, self._default).get(registry)

    def refused(self, registry: RegistryConfig, creds: Credentials) -> bool:
        return self._sources.get(registry.name, self._default).refused(registry, creds)
