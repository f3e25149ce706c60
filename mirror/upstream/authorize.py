"""Answering a registry's 401: Bearer tokens from its realm, or Basic credentials from a source."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Protocol

import aiohttp
from yarl import URL

from mirror.config import RegistryConfig
from mirror.upstream.auth import Challenge, parse_challenges, pull_scope
from mirror.upstream.credentials import Credentials, CredentialSource
from mirror.upstream.errors import UpstreamRefused
from mirror.upstream.redirects import RedirectPolicy, shown
from mirror.upstream.tokens import TokenCache


class Send(Protocol):
    """Sends one request (following redirects without leaking Authorization, and only where
    they may lead: `may_leave`, to another host at all) and returns its answer."""

    def __call__(
        self, method: str, url: URL, headers: dict[str, str], *, may_leave: bool
    ) -> Awaitable[aiohttp.ClientResponse]: ...


_SendOne = Callable[[str, URL, dict[str, str]], Awaitable[aiohttp.ClientResponse]]


class Authorizer:
    def __init__(
        self,
        tokens: TokenCache,
        credentials: CredentialSource,
        send: Send,
        policy: RedirectPolicy | None = None,  # where a token realm may be: as a redirect
    ) -> None:
        self._tokens = tokens
        self._credentials = credentials
        self._policy = policy or RedirectPolicy()
        self._challenges: dict[str, Challenge] = {}  # last challenge seen, per registry
        self._send = send

    async def send(
        self,
        reg: RegistryConfig,
        name: str,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        *,
        may_leave: bool = False,
    ) -> aiohttp.ClientResponse:
        """Sent with what the registry last asked for; a 401 challenge is answered once."""
        send: _SendOne = partial(self._send, may_leave=may_leave)
        creds = await self._credentials.get(reg)
        scope = pull_scope(name)
        sent = dict(headers)
        sent.setdefault("Accept-Encoding", "identity")  # exact bytes: digests cover them
        known = self._challenges.get(reg.name)
        auth = self._known_auth(known, scope, creds)
        if auth:
            sent["Authorization"] = auth
        resp = await send(method, url, sent)
        if not self._challenged(resp, url):
            return resp
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            resp.release()
            if known is not None and auth and auth.startswith("Bearer "):
                # Refused though unexpired (revoked, or the registry restarted with new
                # keys): fetch a new one, once, instead of sending it until it expires.
                self._tokens.forget(known, scope, creds, auth.removeprefix("Bearer "))
            self._check_realm(url, bearer.realm)
            self._challenges[reg.name] = bearer
            token = await self._tokens.token(bearer, scope, creds, requested=bearer.scope)
            sent["Authorization"] = f"Bearer {token}"
            resp = await send(method, url, sent)
            if self._challenged(resp, url):
                self._tokens.forget(bearer, scope, creds, token)  # refused even fresh: give up
            return resp
        if basic is None or creds is None:
            return resp
        self._challenges[reg.name] = basic
        if auth != creds.basic():
            resp.release()
            sent["Authorization"] = creds.basic()
            resp = await send(method, url, sent)
            if not self._challenged(resp, url):
                return resp
        return await self._basic_refused(send, reg, creds, method, url, sent, resp)

    async def _basic_refused(
        self,
        send: _SendOne,
        reg: RegistryConfig,
        creds: Credentials,
        method: str,
        url: URL,
        sent: dict[str, str],
        resp: aiohttp.ClientResponse,
    ) -> aiohttp.ClientResponse:
        """`creds` got a 401: issued credentials (ECR's) may have been revoked or rotated
        early, so the source is told and, if it will ask its issuer anew, tried once more."""
        if not self._credentials.refused(reg, creds):
            return resp  # nothing fresher to offer: the 401 stands
        resp.release()
        fresh = await self._credentials.get(reg)
        if fresh is None:
            return await send(method, url, {k: v for k, v in sent.items() if k != "Authorization"})
        sent["Authorization"] = fresh.basic()
        return await send(method, url, sent)

    def _check_realm(self, url: URL, realm: str) -> None:
        """A realm is where a registry sends the mirror, with credentials, to act on the answer:
        it may lead where a blob redirect may, no further."""
        try:
            target = URL(realm)
            reason = self._policy.refusal(url, target, may_leave=True)
        except ValueError:
            target, reason = URL(), "unreadable"
        if reason is not None:
            raise UpstreamRefused(f"named a token realm at {shown(target)}: {reason}")

    @staticmethod
    def _challenged(resp: aiohttp.ClientResponse, url: URL) -> bool:
        """A 401 from the registry itself. One from a host a redirect led to (a CDN) is never
        answered with the registry's credentials or tokens, nor taken as the registry's
        challenge: that host could name any realm, and it would get them."""
        return resp.status == 401 and resp.url.origin() == url.origin()

    def _known_auth(
        self, challenge: Challenge | None, scope: str, creds: Credentials | None
    ) -> str | None:
        """Skip the 401 round trip when a usable token for this scope is already cached."""
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return creds.basic() if creds else None
        token = self._tokens.cached(challenge, scope, creds)
        return f"Bearer {token}" if token else None
