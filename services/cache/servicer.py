"""gRPC <-> domain translation for the cache service. Behaviour lives in service.py and ratelimit.py.

Who is asking always comes from the verified credentials (current_identity()), never from request
fields: the internal RPCs accept user_id/api_key_id only when they match the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from parley.cache.v1 import cache_pb2, cache_pb2_grpc

from google.protobuf import struct_pb2

from services.cache.backends import BackendUnavailable
from services.cache.budget import BudgetUse
from services.cache.ledger import UsageLedger
from services.cache.ratelimit import RateLimiter, UserLimits
from services.cache.service import ResponseCache
from services.cache.usage_report import Page, Query, UsageReports
from services.cache.usage_store import Counts
from services.core.errors import NotFound, PermissionDenied, Unavailable
from services.core.identity import ROLE_ADMIN, Identity, current_identity

ME = "me"
EVERYONE = "*"
INT32 = 2**31 - 1


def budget_pb(use: BudgetUse) -> cache_pb2.TokenBudget:
    budget = cache_pb2.TokenBudget(period=use.period.name, limit=use.limit, used=min(use.used, INT32),
                                   remaining=min(use.remaining, INT32))
    budget.reset_time.FromDatetime(use.period.end)
    return budget


def rate_limit_pb(limits: UserLimits, uses: list[BudgetUse] | None = None) -> cache_pb2.RateLimit:
    given = limits.limits
    return cache_pb2.RateLimit(user_id=limits.user_id, requests_per_minute=given.requests_per_minute,
                               tokens_per_minute=given.tokens_per_minute, overridden=limits.overridden,
                               tokens_per_day=given.tokens_per_day, tokens_per_month=given.tokens_per_month,
                               budgets=[budget_pb(u) for u in uses or ()], share_weight=given.share_weight)


def usage_pb(page: Page) -> cache_pb2.GetUsageResponse:
    answer = cache_pb2.GetUsageResponse(object="page", has_more=page.next_page is not None)
    if page.next_page is None:
        answer.next_page.null_value = struct_pb2.NULL_VALUE
    else:
        answer.next_page.string_value = page.next_page
    for bucket in page.buckets:
        results = []
        for line in bucket.lines:
            c = line.counts
            results.append(cache_pb2.UsageResult(
                object="organization.usage.completions.result", input_tokens=min(c.input_tokens, INT32),
                output_tokens=min(c.output_tokens, INT32), input_cached_tokens=min(c.input_cached_tokens, INT32),
                num_model_requests=min(c.requests, INT32), num_cached_requests=min(c.cached_requests, INT32),
                cached_tokens=min(c.cached_tokens, INT32), **{k: v for k, v in line.groups.items() if v is not None}))
        answer.data.append(cache_pb2.UsageBucket(object="bucket", start_time=bucket.start, end_time=bucket.end,
                                                 results=results))
    return answer


def caller_subject(user_id: str, api_key_id: str) -> Identity:
    """The caller, after checking that the ids it named (if any) are its own."""
    identity = current_identity()
    if user_id and user_id != identity.user_id:
        raise PermissionDenied("user_id does not match the caller's credentials")
    if api_key_id and api_key_id != (identity.api_key_id or ""):
        raise PermissionDenied("api_key_id does not match the caller's credentials")
    return identity


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: ResponseCache, limiter: RateLimiter, reports: UsageReports,
                 user_exists: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """`user_exists` (services.auth.client.user_exists) keeps overrides to real accounts; without
        it (unit tests) any id is taken."""
        self.cache = cache
        self.limiter = limiter
        self.reports = reports
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
            limits = await self.limiter.limits_for(user_id)
            return rate_limit_pb(limits, await self.limiter.budget_uses(limits))
        except BackendUnavailable:
            raise Unavailable("the cache backend is unavailable; try again") from None

    async def UpdateRateLimit(self, request: cache_pb2.UpdateRateLimitRequest,
                              context: grpc.aio.ServicerContext) -> cache_pb2.RateLimit:
        limit = request.rate_limit
        identity = current_identity()
        user_id = identity.user_id if limit.user_id in ("", ME) else limit.user_id
        if user_id != identity.user_id and self.user_exists is not None and not await self.user_exists(user_id):
            raise NotFound(f"no user with id {user_id!r}")
        budgets = [getattr(limit, f) if limit.HasField(f) else None for f in ("tokens_per_day", "tokens_per_month")]
        try:
            weight = limit.share_weight if limit.HasField("share_weight") else None
            updated = await self.limiter.update(user_id, limit.requests_per_minute, limit.tokens_per_minute, *budgets,
                                                share_weight=weight)
            return rate_limit_pb(updated, await self.limiter.budget_uses(updated))
        except BackendUnavailable:
            raise Unavailable("the cache backend is unavailable; the override was not saved") from None

    async def GetUsage(self, request: cache_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> cache_pb2.GetUsageResponse:
        identity = current_identity()
        whose: str | None = identity.user_id if request.user_id in ("", ME) else request.user_id
        if whose != identity.user_id and not identity.has_role(ROLE_ADMIN):
            raise NotFound(f"no usage of a user with id {request.user_id[:64]!r}")
        query = Query(request.start_time, request.end_time, request.bucket_width, list(request.group_by),
                      request.limit, request.page)
        return usage_pb(await self.reports.page(query, None if whose == EVERYONE else whose))


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
    """Fails open: with the backend unavailable every request is allowed (and nothing counted in
    it; the ledger still records usage)."""

    def __init__(self, limiter: RateLimiter, ledger: UsageLedger) -> None:
        self.limiter = limiter
        self.ledger = ledger

    async def CheckRateLimit(self, request: cache_pb2.CheckRateLimitRequest,
                             context: grpc.aio.ServicerContext) -> cache_pb2.CheckRateLimitResponse:
        identity = caller_subject(request.user_id, request.api_key_id)
        try:
            decision = await self.limiter.check(identity.user_id, identity.api_key_id or "")
        except BackendUnavailable:
            return cache_pb2.CheckRateLimitResponse(allowed=True, reason="rate limits are not enforced: backend unavailable")
        return cache_pb2.CheckRateLimitResponse(allowed=decision.allowed,
                                                retry_after_seconds=decision.retry_after_seconds,
                                                reason=decision.reason, code=decision.code,
                                                share_weight=decision.share_weight)

    async def RecordUsage(self, request: cache_pb2.RecordUsageRequest,
                          context: grpc.aio.ServicerContext) -> cache_pb2.RecordUsageResponse:
        identity = caller_subject(request.user_id, request.api_key_id)
        r = request
        tokens = max(0, r.tokens, r.prompt_tokens + r.completion_tokens)
        if r.cached:
            counts = Counts(cached_requests=1, cached_tokens=tokens)
        else:
            counts = Counts(1, max(0, r.prompt_tokens), max(0, r.completion_tokens), max(0, r.cached_prompt_tokens))
        self.ledger.add(identity.user_id, identity.api_key_id or "", r.model[:200], counts)
        if r.cached:
            return cache_pb2.RecordUsageResponse()  # a replayed answer costs no generation: no limit counts it
        try:
            await self.limiter.record(identity.user_id, identity.api_key_id or "", tokens)
        except BackendUnavailable:
            pass
        return cache_pb2.RecordUsageResponse()
