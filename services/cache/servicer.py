"""gRPC <-> domain translation for the cache service. Behaviour lives in service.py and ratelimit.py.

Who is asking always comes from the verified credentials (current_identity()), never from request
fields: the internal RPCs accept user_id/api_key_id only when they match the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from parley.cache.v1 import cache_pb2, cache_pb2_grpc

from services.cache.backends import BackendUnavailable
from services.cache.ratelimit import RateLimiter, UserLimits
from services.cache.service import ResponseCache
from services.core.errors import NotFound, PermissionDenied, Unavailable
from services.core.identity import ROLE_ADMIN, Identity, current_identity

ME = "me"


def rate_limit_pb(limits: UserLimits) -> cache_pb2.RateLimit:
    return cache_pb2.RateLimit(user_id=limits.user_id, requests_per_minute=limits.limits.requests_per_minute,
                               tokens_per_minute=limits.limits.tokens_per_minute, overridden=limits.overridden)


def caller_subject(user_id: str, api_key_id: str) -> Identity:
    """The caller, after checking that the ids it named (if any) are its own."""
    identity = current_identity()
    if user_id and user_id != identity.user_id:
        raise PermissionDenied("user_id does not match the caller's credentials")
    if api_key_id and api_key_id != (identity.api_key_id or ""):
        raise PermissionDenied("api_key_id does not match the caller's credentials")
    return identity


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: ResponseCache, limiter: RateLimiter,
                 user_exists: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """`user_exists` (services.auth.client.user_exists) keeps overrides to real accounts; without
        it (unit tests) any id is taken."""
        self.cache = cache
        self.limiter = limiter
        self.user_exists = user_exists

    async def GetCacheStats(self, request: cache_pb2.GetCacheStatsRequest,
                            context: grpc.aio.ServicerContext) -> cache_pb2.GetCacheStatsResponse:
        s = await self.cache.stats()
        return cache_pb2.GetCacheStatsResponse(
            backend=s.backend, hits=s.hits, misses=s.misses, hit_ratio=s.hit_ratio, entries=s.entries,
            bytes=s.bytes, degraded=s.degraded, last_error=s.last_error,
        )

    async def FlushCache(self, request: cache_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> cache_pb2.FlushCacheResponse:
        return cache_pb2.FlushCacheResponse(removed=await self.cache.flush())

    async def GetRateLimit(self, request: cache_pb2.GetRateLimitRequest,
                           context: grpc.aio.ServicerContext) -> cache_pb2.RateLimit:
        identity = current_identity()
        user_id = identity.user_id if request.user_id in ("", ME) else request.user_id
        if user_id != identity.user_id and not identity.has_role(ROLE_ADMIN):
            raise PermissionDenied("only admins can read another user's rate limits")
        try:
            return rate_limit_pb(await self.limiter.limits_for(user_id))
        except BackendUnavailable:
            raise Unavailable("the cache backend is unavailable; try again") from None

    async def UpdateRateLimit(self, request: cache_pb2.UpdateRateLimitRequest,
                              context: grpc.aio.ServicerContext) -> cache_pb2.RateLimit:
        limit = request.rate_limit
        identity = current_identity()
        user_id = identity.user_id if limit.user_id in ("", ME) else limit.user_id
        if user_id != identity.user_id and self.user_exists is not None and not await self.user_exists(user_id):
            raise NotFound(f"no user with id {user_id!r}")
        try:
            updated = await self.limiter.update(user_id, limit.requests_per_minute, limit.tokens_per_minute)
        except BackendUnavailable:
            raise Unavailable("the cache backend is unavailable; the override was not saved") from None
        return rate_limit_pb(updated)


class ResponseCacheServicer(cache_pb2_grpc.ResponseCacheServiceServicer):
    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def GetCachedCompletion(self, request: cache_pb2.GetCachedCompletionRequest,
                                  context: grpc.aio.ServicerContext) -> cache_pb2.GetCachedCompletionResponse:
        completion = await self.cache.lookup(request.key, current_identity().user_id)
        if completion is None:
            return cache_pb2.GetCachedCompletionResponse(hit=False)
        return cache_pb2.GetCachedCompletionResponse(hit=True, completion=completion)

    async def PutCachedCompletion(self, request: cache_pb2.PutCachedCompletionRequest,
                                  context: grpc.aio.ServicerContext) -> cache_pb2.PutCachedCompletionResponse:
        stored = await self.cache.store(request.key, request.completion, current_identity().user_id)
        return cache_pb2.PutCachedCompletionResponse(stored=stored)


class RateLimitServicer(cache_pb2_grpc.RateLimitServiceServicer):
    """Fails open: with the backend unavailable every request is allowed (and nothing counted)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def CheckRateLimit(self, request: cache_pb2.CheckRateLimitRequest,
                             context: grpc.aio.ServicerContext) -> cache_pb2.CheckRateLimitResponse:
        identity = caller_subject(request.user_id, request.api_key_id)
        try:
            decision = await self.limiter.check(identity.user_id, identity.api_key_id or "")
        except BackendUnavailable:
            return cache_pb2.CheckRateLimitResponse(allowed=True, reason="rate limits are not enforced: backend unavailable")
        return cache_pb2.CheckRateLimitResponse(allowed=decision.allowed,
                                                retry_after_seconds=decision.retry_after_seconds,
                                                reason=decision.reason)

    async def RecordUsage(self, request: cache_pb2.RecordUsageRequest,
                          context: grpc.aio.ServicerContext) -> cache_pb2.RecordUsageResponse:
        identity = caller_subject(request.user_id, request.api_key_id)
        try:
            await self.limiter.record(identity.user_id, identity.api_key_id or "", request.tokens)
        except BackendUnavailable:
            pass
        return cache_pb2.RecordUsageResponse()
