"""Bearer tokens from a registry's token realm: cached until expiry, one fetch per scope."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from cachetools import LRUCache

from mirror.coalesce import SingleFlight
from mirror.upstream.auth import Challenge
from mirror.upstream.credentials import Credentials
from mirror.upstream.errors import UpstreamError, UpstreamRefused, UpstreamUnavailable
from mirror.upstream.session import refused_address

# Tokens are used a little before they expire, so a request never leaves with a dead one.
_EXPIRY_MARGIN = 10.0
_MAX_TOKENS = 10_000
_DEFAULT_LIFETIME = 60.0  # the token spec's default when expires_in is absent


_Key = tuple[str, str, str, str]


def _key(challenge: Challenge, scope: str, creds: Credentials | None) -> _Key:
    return (challenge.realm, challenge.service, scope, creds.username if creds else "")


class TokenCache:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout: aiohttp.ClientTimeout,
        clock: Callable[[], float],
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._clock = clock
        # One entry per repository scope: bounded, so random names cannot grow it forever.
        self._tokens: LRUCache[_Key, tuple[str, float]] = LRUCache(_MAX_TOKENS)
        self._fetches: SingleFlight[_Key, tuple[str, float]] = SingleFlight("token")

    async def close(self) -> None:
        await self._fetches.close()

    def cached(self, challenge: Challenge, scope: str, creds: Credentials | None) -> str | None:
        hit = self._tokens.get(_key(challenge, scope, creds))
        if hit and hit[1] > self._clock():
            return hit[0]
        return None

    async def token(
        self, challenge: Challenge, scope: str, creds: Credentials | None, *, requested: str = ""
    ) -> str:
        """A token kept under `scope`, which is what a later cached() asks with; `requested`
        is what the realm is asked for when the registry's challenge named a scope of its
        own (`repository:a/b:pull,push`), which need not be the scope the caller looks up."""
        key = _key(challenge, scope, creds)
        hit = self._tokens.get(key)
        if hit and hit[1] > self._clock():
            return hit[0]
        (token, expires_at), _ = await self._fetches.do(
            key, lambda: self._fetch(challenge, requested or scope, creds)
        )
        self._tokens[key] = (token, expires_at)
        return token

    def forget(
        self, challenge: Challenge, scope: str, creds: Credentials | None, token: str
    ) -> None:
        """The registry refused `token` (revoked, or the registry restarted with new keys):
        the next token() fetches a new one. A newer token another request put there stays."""
        key = _key(challenge, scope, creds)
        hit = self._tokens.get(key)
        if hit is not None and hit[0] == token:
            del self._tokens[key]

    async def _fetch(
        self, challenge: Challenge, scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        params = {"scope": scope} if scope else {}
        if challenge.service:
            params["service"] = challenge.service
        headers = {"Authorization": creds.basic()} if creds else {}
        started = self._clock()
        try:
            async with self._session.get(
                challenge.realm, params=params, headers=headers, timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    raise UpstreamError(resp.status, f"token endpoint answered {resp.status}")
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            refused = refused_address(exc)
            if refused is not None:  # a realm by a name for a forbidden address
                raise UpstreamRefused(f"named a token realm where {refused}") from None
            raise UpstreamUnavailable(f"token endpoint failed: {type(exc).__name__}") from exc
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamError(502, "token endpoint returned no token")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = _DEFAULT_LIFETIME
        return token, started + max(1.0, float(lifetime) - _EXPIRY_MARGIN)
