"""Wires the cache service: settings, backend (in-process LRU or Redis), the usage ledger and its
database (SQLite file or PostgreSQL schema, as auth and session), servicers, identity."""

from __future__ import annotations

import asyncio
import logging

from parley.cache.v1 import cache_pb2, cache_pb2_grpc

from services.auth import client as auth_client
from services.cache.backends import BackendUnavailable, open_backend
from services.cache.ledger import UsageLedger
from services.cache.ratelimit import RateLimiter
from services.cache.service import ResponseCache
from services.cache.servicer import CacheServicer, RateLimitServicer, ResponseCacheServicer
from services.cache.settings import CacheSettings
from services.cache.usage_report import UsageReports
from services.cache.usage_store import UsageStore
from services.core import config, database, identity
from services.core.config import CommonSettings, DatabaseSettings
from services.core.server import Registration, ServiceSpec

log = logging.getLogger("parley.cache")


async def build(common: CommonSettings, settings: CacheSettings | None = None,
                verifier: identity.CredentialVerifier | None = None,
                database_settings: DatabaseSettings | None = None) -> ServiceSpec:
    """`verifier` replaces the auth service's in tests."""
    settings = settings or config.load(CacheSettings)
    database_settings = database_settings or config.load(DatabaseSettings)
    log.info("settings", extra={"fields": {**config.describe(settings), **config.describe(database_settings)}})
    store = await asyncio.to_thread(UsageStore, database.location(common.data_dir, database_settings, "usage"))
    ledger = UsageLedger(store, settings.usage_flush_seconds)
    ledger.start()
    backend = open_backend(settings)
    cache = ResponseCache(backend, settings)
    limiter = RateLimiter(backend, settings, ledger_sum=ledger.tokens)

    async def close() -> None:
        await ledger.close()
        store.close()
        await backend.close()

    async def ready() -> None:
        # Redis being down is a degraded cache, not an unhealthy service: health turns SERVING anyway.
        try:
            await backend.ping()
        except BackendUnavailable:
            pass

    names = cache_pb2.DESCRIPTOR.services_by_name
    public = names["CacheService"].full_name
    admin_only = {f"/{public}/{method}": ("admin",) for method in ("FlushCache", "UpdateRateLimit")}
    return ServiceSpec(
        name="cache",
        registrations=[
            Registration(public, cache_pb2_grpc.add_CacheServiceServicer_to_server,
                         CacheServicer(cache, limiter, UsageReports(ledger),
                                       None if verifier is not None else auth_client.user_exists(common))),
            Registration(names["ResponseCacheService"].full_name,
                         cache_pb2_grpc.add_ResponseCacheServiceServicer_to_server, ResponseCacheServicer(cache)),
            Registration(names["RateLimitService"].full_name,
                         cache_pb2_grpc.add_RateLimitServiceServicer_to_server, RateLimitServicer(limiter, ledger)),
        ],
        ready=ready,
        close=close,
        interceptors=[identity.IdentityInterceptor(verifier, roles=admin_only) if verifier is not None
                      else auth_client.interceptor(common, roles=admin_only)],
    )
