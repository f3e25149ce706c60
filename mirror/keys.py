"""Typed slots on the application for the long-lived objects create_app builds. No logic."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from mirror.cache.blobs import BlobService
from mirror.cache.janitor import CacheJanitor
from mirror.cache.manifests import ManifestService
from mirror.cache.second import SecondLevel
from mirror.cache.uploads import Uploader
from mirror.cache.warming import WarmService
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.storage.local import CacheStore
from mirror.upstream.client import RegistryClient
from mirror.upstream.credentials import CredentialSource
from mirror.upstream.peer import Peers

config_key = web.AppKey("config", Config)
metrics_key = web.AppKey("metrics", Metrics)
store_key = web.AppKey("store", CacheStore)
blobs_key = web.AppKey("blobs", BlobService)
manifests_key = web.AppKey("manifests", ManifestService)
janitor_key = web.AppKey("janitor", CacheJanitor)
# The client session every upstream request goes through.
session_key = web.AppKey("session", aiohttp.ClientSession)
upstream_key = web.AppKey("upstream", RegistryClient)
# What each registry's requests are signed with (static, or issued by ECR).
credentials_key = web.AppKey("credentials", CredentialSource)
# Threads that run sendfile for cached blobs (one per transfer in progress).
sendfile_pool_key = web.AppKey("sendfile_pool", ThreadPoolExecutor)
warm_key = web.AppKey("warm", WarmService)
# The region's bucket (only when [s3] names one) and what copies blobs into it.
second_key = web.AppKey("second", SecondLevel)
uploads_key = web.AppKey("uploads", Uploader)
# The other replicas of the regional tier (only with [cluster]).
peers_key = web.AppKey("peers", Peers)
# On the admin app: the registry app, whose services (the warm service) it uses.
services_key = web.AppKey("services", web.Application)
# The id of a request from the one the client supplied, if any (mirror.http.headers.RequestIds:
# both request paths draw from the same one).
request_ids_key = web.AppKey[Callable[[str | None], str]]("request_ids")

# Per-request notes the handlers leave for the middleware's access line and metrics.
request_id_key = web.RequestKey("mirror.request_id", str)
kind_key = web.RequestKey("mirror.kind", str)  # manifest | blob | tags | base | ...
result_key = web.RequestKey("mirror.result", str)  # hit | miss | coalesced | stale | error ...
registry_key = web.RequestKey("mirror.registry", str)
# Body bytes a handler sent itself (sendfile bypasses aiohttp's own count).
sent_key = web.RequestKey("mirror.sent", int)
