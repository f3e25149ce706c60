"""One aiobotocore ECR client, made at its first call and made anew when AWS credentials fail.

aiobotocore resolves the AWS credential chain when a client is created and keeps what it found
(or that it found nothing) for the client's lifetime. Made at start-up, a client would tie the
mirror's start to AWS (an EKS Pod Identity agent not yet up fails it after seconds) and keep
"no credentials" until a restart. Made here, on demand, neither happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from botocore.exceptions import (
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
)

if TYPE_CHECKING:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession
    from types_aiobotocore_ecr import ECRClient

# The chain found nothing, or a link of it failed: another look may find what appeared since
# (keys in the environment, an instance role or pod identity agent that came up).
CREDENTIAL_FAILURES = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)


class LazyEcrClient:
    """An EcrApi for one region and endpoint. How often it is called, and so how often the
    chain is looked at again, is for its caller (EcrCredentials) to bound."""

    def __init__(
        self, session: AioSession, region: str, endpoint_url: str | None, config: AioConfig
    ) -> None:
        self._session = session
        self._region = region
        self._endpoint_url = endpoint_url
        self._config = config
        self._client: ECRClient | None = None
        self._opening = asyncio.Lock()

    async def get_authorization_token(self) -> Mapping[str, Any]:
        client = await self._open()
        try:
            return await client.get_authorization_token()
        except CREDENTIAL_FAILURES:
            await self._discard(client)  # the next call resolves the chain again
            raise

    async def close(self) -> None:
        if self._client is not None:
            await self._discard(self._client)

    async def _open(self) -> ECRClient:
        async with self._opening:
            if self._client is None:
                # Resolves the credential chain (CredentialRetrievalError reaches the caller
                # and leaves nothing to close); the session keeps credentials only once found.
                context = self._session.create_client(
                    "ecr",
                    region_name=self._region,
                    endpoint_url=self._endpoint_url,
                    config=self._config,
                )
                self._client = await context.__aenter__()
            return self._client

    async def _discard(self, client: ECRClient) -> None:
        if self._client is client:
            self._client = None
        await client.close()
