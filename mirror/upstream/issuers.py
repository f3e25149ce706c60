"""Which credential source each registry gets: its config, or Amazon ECR's token service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from mirror.config import RegistryConfig, UpstreamConfig
from mirror.upstream.credentials import CredentialsByRegistry, CredentialSource, StaticCredentials

if TYPE_CHECKING:
    from aiobotocore.session import AioSession


@asynccontextmanager
async def open_credentials(
    registries: Mapping[str, RegistryConfig],
    config: UpstreamConfig,
    aws_session: AioSession | None = None,
) -> AsyncIterator[CredentialSource]:
    """The source for every configured registry, open for the app's lifetime.

    `aws_session`: where ECR's AWS credentials come from; None is the standard chain
    (environment, profile, instance role, IRSA web identity).
    """
    ecr = [r for r in registries.values() if r.uses_ecr]
    if not ecr:
        yield StaticCredentials()
        return
    # Imported here, not at the top: aiobotocore takes a few hundred milliseconds to import,
    # which a mirror without ECR registries should not pay at every start.
    from mirror.upstream.ecr import open_ecr_credentials

    async with open_ecr_credentials(ecr, config, aws_session) as source:
        yield CredentialsByRegistry({r.name: source for r in ecr}, StaticCredentials())
