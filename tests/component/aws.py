"""AWS sessions for tests: fixed dummy keys, or a credential chain the test switches at will
(nothing yet, a failing or hanging provider, keys that appear), never through os.environ."""

from __future__ import annotations

import asyncio

from aiobotocore.credentials import AioCredentialResolver, AioCredentials
from aiobotocore.session import AioSession, get_session

AWS_SECRET = "not-a-real-secret"


def aws_session() -> AioSession:
    """Dummy keys given to the session itself."""
    session = get_session()
    session.set_credentials("AKIDTESTING", AWS_SECRET)
    return session


class SwitchedChain:
    """The only link of a session's credential chain. What load() does is the test's to set:
    find nothing (keys None), raise `error`, or wait at `gate`; `loads` counts the looks."""

    METHOD = "test-switched"
    CANONICAL_NAME = "TestSwitched"

    def __init__(self) -> None:
        self.keys: tuple[str, str] | None = None
        self.error: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.loads = 0

    def session(self) -> AioSession:
        session = get_session()
        session.register_component("credential_provider", AioCredentialResolver([self]))
        return session

    async def load(self) -> AioCredentials | None:
        self.loads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return AioCredentials(*self.keys, method=self.METHOD) if self.keys else None
