"""The one ECR call the mirror makes, on a client made on demand (see mirror.aws)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mirror.aws import CREDENTIAL_FAILURES, LazyClient

if TYPE_CHECKING:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession


class LazyEcrClient:
    """An EcrApi for one region and endpoint. How often it is called, and so how often the
    chain is looked at again, is for its caller (EcrCredentials) to bound."""

    def __init__(
        self, session: AioSession, region: str, endpoint_url: str | None, config: AioConfig
    ) -> None:
        self._client = LazyClient(session, "ecr", region, endpoint_url, config)

    async def get_authorization_token(self) -> Mapping[str, Any]:
        client = await self._client.get()
        try:
            reply: Mapping[str, Any] = await client.get_authorization_token()
        except CREDENTIAL_FAILURES:
            await self._client.refused(client)  # the next call resolves the chain again
            raise
        return reply

    async def close(self) -> None:
        await self._client.close()
