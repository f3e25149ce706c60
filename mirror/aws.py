"""One aiobotocore client, made at its first call and made anew when AWS credentials fail.

aiobotocore resolves the AWS credential chain when a client is created and keeps what it found
(or that it found nothing) for the client's lifetime. Made at start-up, a client would tie the
mirror's start to AWS (an EKS Pod Identity agent not yet up fails it after seconds) and keep
"no credentials" until a restart. Made here, on demand, neither happens.

Imported only when some registry uses ECR or an S3 level is configured: aiobotocore is slow
to import, and a mirror without either should not pay for it at every start.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from botocore.exceptions import (
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
)

if TYPE_CHECKING:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

# The chain found nothing, or a link of it failed: another look may find what appeared since
# (keys in the environment, an instance role or pod identity agent that came up).
CREDENTIAL_FAILURES = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)


class LazyClient:
    """A client of one AWS service in one region and endpoint. How often it is made, and so
    how often the chain is looked at again, is for its callers to bound."""

    def __init__(
        self,
        session: AioSession,
        service: str,
        region: str,
        endpoint_url: str | None,
        config: AioConfig,
    ) -> None:
        self._session = session
        self._service = service
        self._region = region
        self._endpoint_url = endpoint_url
        self._config = config
        self._client: Any = None
        self._opening = asyncio.Lock()

    async def get(self) -> Any:
        async with self._opening:
            if self._client is None:
                # Resolves the credential chain (CredentialRetrievalError reaches the caller
                # and leaves nothing to close); the session keeps credentials only once found.
                context = self._session.create_client(
                    self._service,  # type: ignore[call-overload]  # one of many literals
                    region_name=self._region,
                    endpoint_url=self._endpoint_url,
                    config=self._config,
                )
                self._client = await context.__aenter__()
            return self._client

    async def refused(self, client: Any) -> None:
        """`client`'s credentials failed: the next get() resolves the chain again."""
        if self._client is client:
            self._client = None
            await client.close()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
