"""The response cache: lookups and stores of deterministic completions, stats and flush.

Backend trouble never reaches the caller: a lookup becomes a miss, a store is skipped. The stats
say so (`degraded`, `last_error`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from parley.cache.v1 import cache_pb2

from services.cache import keys, metrics
from services.cache.backends import ENTRY_PREFIX, Backend, BackendUnavailable, EntryStats, RedisBackend
from services.cache.settings import CacheSettings
from services.core.errors import Unavailable

log = logging.getLogger("parley.cache")


@dataclass(frozen=True)
class CacheStats:
    backend: str
    hits: int
    misses: int
    entries: int
    bytes: int
    degraded: bool
    last_error: str

    @property
    def hit_ratio(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0


class ResponseCache:
    def __init__(self, backend: Backend, settings: CacheSettings) -> None:
        self.backend = backend
        self.settings = settings

    def entry_key(self, key: cache_pb2.CompletionKey, user_id: str) -> str:
        scope = user_id if self.settings.cache_scope == "user" else ""
        return ENTRY_PREFIX + keys.digest(key, scope)

    async def lookup(self, key: cache_pb2.CompletionKey, user_id: str) -> cache_pb2.CachedCompletion | None:
        if keys.cacheable(key) is not None:
            return None
        try:
            raw = await self.backend.lookup(self.entry_key(key, user_id))
        except BackendUnavailable:
            metrics.MISSES.inc()
            return None
        if raw is None:
            metrics.MISSES.inc()
            return None
        completion = cache_pb2.CachedCompletion()
        try:
            completion.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a corrupt entry is a miss, not an error
            log.warning("unreadable cache entry ignored")
            metrics.MISSES.inc()
            return None
        metrics.HITS.inc()
        return completion

    async def store(self, key: cache_pb2.CompletionKey, completion: cache_pb2.CachedCompletion, user_id: str) -> bool:
        """False when the key is not cacheable, the answer was cut short or is too large, or the
        backend is unavailable."""
        if keys.cacheable(key) is not None:
            return False
        if completion.finish_reason not in keys.COMPLETE:
            return False
        value = completion.SerializeToString()
        if len(value) > self.settings.cache_max_entry_bytes:
            return False
        try:
            await self.backend.store(self.entry_key(key, user_id), value, self.settings.cache_ttl_seconds)
        except BackendUnavailable:
            return False
        return True

    async def stats(self) -> CacheStats:
        try:
            counts = await self.backend.entry_stats()
        except BackendUnavailable:
            counts = self.backend.last_known_stats if isinstance(self.backend, RedisBackend) else EntryStats()
        return CacheStats(self.backend.name, counts.hits, counts.misses, counts.entries, counts.bytes,
                          self.backend.degraded, self.backend.last_error)

    async def flush(self) -> int:
        try:
            return await self.backend.flush()
        except BackendUnavailable as exc:
            raise Unavailable(f"the cache backend is unavailable, nothing was flushed ({exc})") from None
