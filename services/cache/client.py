"""How other services use the cache service: response cache lookups/stores and rate limits.

Every call is made on behalf of the current caller (core.identity.current_identity()) with their
credentials forwarded; the cache service verifies them itself. Nothing here fails a chat: when the
cache service is down or slow, a lookup is a miss, a store is skipped, usage goes unrecorded and the
rate limit allows the request. Only an actual "over the limit" answer raises (ResourceExhausted,
which becomes 429 with Retry-After; QuotaExceeded for a used-up token budget).

Create it inside a running event loop (a service's async build()): it opens a gRPC channel.
"""

from __future__ import annotations

import logging
import time

import grpc
from parley.cache.v1 import cache_pb2, cache_pb2_grpc
from parley.inference.v1 import inference_pb2

from services.cache import keys
from services.core import channels
from services.core.config import CommonSettings
from services.core.errors import QuotaExceeded, ResourceExhausted
from services.core.identity import forward_credentials, optional_identity

log = logging.getLogger("parley.cache.client")

WARNING_INTERVAL_SECONDS = 60.0


class CacheClient:
    def __init__(self, common: CommonSettings, timeout_seconds: float = 0.25) -> None:
        self.timeout = timeout_seconds
        self._channel = channels.open_channel(common, "cache")
        self._cache = cache_pb2_grpc.ResponseCacheServiceStub(self._channel)
        self._limits = cache_pb2_grpc.RateLimitServiceStub(self._channel)
        self._stats = cache_pb2_grpc.CacheServiceStub(self._channel)
        self._last_warning: float | None = None

    @staticmethod
    def is_deterministic(sampling: inference_pb2.SamplingParams) -> bool:
        """temperature explicitly 0, or a seed: only such requests are looked up and stored."""
        return keys.is_deterministic(sampling)

    def _unreachable(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= WARNING_INTERVAL_SECONDS:
            self._last_warning = now
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            log.warning("cache service unavailable; going on without it",
                        extra={"fields": {"call": what, "error": code}})

    async def lookup(self, key: cache_pb2.CompletionKey) -> cache_pb2.CachedCompletion | None:
        """The cached completion, or None (miss, not deterministic, or any error)."""
        if keys.cacheable(key) is not None:
            return None
        try:
            answer = await self._cache.GetCachedCompletion(
                cache_pb2.GetCachedCompletionRequest(key=key), metadata=forward_credentials(), timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation, never a failure
            self._unreachable("lookup", exc)
            return None
        return answer.completion if answer.hit else None

    async def store(self, key: cache_pb2.CompletionKey, completion: cache_pb2.CachedCompletion) -> bool:
        """True when stored; False when not cacheable, refused, or on any error."""
        if keys.cacheable(key) is not None:
            return False
        try:
            answer = await self._cache.PutCachedCompletion(
                cache_pb2.PutCachedCompletionRequest(key=key, completion=completion),
                metadata=forward_credentials(), timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001
            self._unreachable("store", exc)
            return False
        return answer.stored

    def _subject(self) -> tuple[str, str]:
        identity = optional_identity()
        if identity is None:
            return "", ""
        return identity.user_id, identity.api_key_id or ""

    async def check_rate_limit(self) -> float:
        """Counts one request for the current caller; ResourceExhausted when over the limit. Returns
        the caller's fair-share weight (services.inference.engines.fair; 1 when the cache cannot say)."""
        user_id, api_key_id = self._subject()
        try:
            answer = await self._limits.CheckRateLimit(
                cache_pb2.CheckRateLimitRequest(user_id=user_id, api_key_id=api_key_id),
                metadata=forward_credentials(), timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - fail open: a cache outage must not stop chats
            self._unreachable("check_rate_limit", exc)
            return 1.0
        if not answer.allowed:
            refusal = QuotaExceeded if answer.code == QuotaExceeded.reason else ResourceExhausted
            raise refusal(answer.reason or "rate limit reached; try again later",
                          retry_after=max(1, answer.retry_after_seconds))
        return answer.share_weight or 1.0

    async def record_usage(self, model: str, prompt_tokens: int, completion_tokens: int, *,
                           cached_prompt_tokens: int = 0, cached: bool = False) -> None:
        """Records one request of the current caller: the usage ledger, and (unless it is an answer
        replayed from the response cache, `cached`) the per-minute counters and token budgets."""
        user_id, api_key_id = self._subject()
        size = 2**31 - 1
        prompt, completion = min(max(0, prompt_tokens), size), min(max(0, completion_tokens), size)
        try:
            await self._limits.RecordUsage(
                cache_pb2.RecordUsageRequest(
                    user_id=user_id, api_key_id=api_key_id, tokens=min(prompt + completion, size), model=model,
                    prompt_tokens=prompt, completion_tokens=completion, cached=cached,
                    cached_prompt_tokens=min(max(0, cached_prompt_tokens), size)),
                metadata=forward_credentials(), timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001
            self._unreachable("record_usage", exc)

    async def hit_ratio(self) -> float | None:
        """The response cache's hit ratio (for the admin summary), or None while it does not answer."""
        try:
            stats = await self._stats.GetCacheStats(cache_pb2.GetCacheStatsRequest(),
                                                    metadata=forward_credentials(), timeout=2)
        except Exception as exc:  # noqa: BLE001
            self._unreachable("stats", exc)
            return None
        return stats.hit_ratio

    async def close(self) -> None:
        await self._channel.close()
