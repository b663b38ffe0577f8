"""Where cached responses, rate-limit counters and limit overrides live.

Two implementations of one small interface:
- `MemoryBackend`: an in-process LRU bounded by entry count and total bytes (the `make run` default);
  counters and overrides live in plain dicts and die with the process.
- `RedisBackend`: a real Redis-protocol server (redis-py asyncio), shared by every cache replica.
  Every round trip runs under a short timeout. When one fails or is too slow the backend raises
  `BackendUnavailable`, marks itself degraded (with the error, visible in stats), logs a warning at
  most once per interval and skips Redis for a short retry period; the first operation after that
  period tries again, and success clears the degraded state. Callers treat `BackendUnavailable` as
  "bypass the cache": a miss, nothing stored, the request allowed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.cache import metrics
from services.cache.settings import CacheSettings

log = logging.getLogger("parley.cache")
T = TypeVar("T")

PREFIX = "parley:"
ENTRY_PREFIX = PREFIX + "entry:"
HITS_KEY = PREFIX + "stats:hits"
MISSES_KEY = PREFIX + "stats:misses"
SCAN_BATCH = 500


class BackendUnavailable(Exception):
    """The backend cannot answer right now; the caller bypasses the cache."""


@dataclass(frozen=True)
class EntryStats:
    hits: int = 0
    misses: int = 0
    entries: int = 0
    bytes: int = 0


class Backend(Protocol):
    name: str
    degraded: bool
    last_error: str

    async def lookup(self, key: str) -> bytes | None:
        """The entry, counting a hit or a miss."""

    async def store(self, key: str, value: bytes, ttl_seconds: float) -> None: ...

    async def flush(self) -> int:
        """Drops every entry; returns how many."""

    async def entry_stats(self) -> EntryStats: ...

    async def add(self, increments: Mapping[str, int], ttl_seconds: float, read: Sequence[str] = ()) -> list[int]:
        """Adds to counters (creating them with the TTL), then returns the values of `read`:
        one round trip, so a check-and-count is atomic per counter."""

    async def seed(self, key: str, value: int, ttl_seconds: float) -> int:
        """Creates a counter with `value` unless it exists; returns the counter's value."""

    async def get_value(self, key: str) -> bytes | None:
        """A durable value (no TTL): limit overrides."""

    async def put_value(self, key: str, value: bytes | None) -> None:
        """Sets, or with None deletes, a durable value."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """Size-bounded LRU with per-entry expiry; counters and overrides in dicts."""

    name = "memory"
    degraded = False
    last_error = ""

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._counters: dict[str, tuple[int, float]] = {}
        self._values: dict[str, bytes] = {}

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key) + len(value)

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= self._size(key, value)

    async def lookup(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is not None and found[1] <= self._clock():
            self._drop(key)
            found = None
        if found is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return found[0]

    async def store(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if key in self._entries:
            self._drop(key)
        size = self._size(key, value)
        if size > self.max_bytes:
            return
        self._entries[key] = (value, self._clock() + ttl_seconds)
        self._bytes += size
        # Expired entries go first, then the least recently used, until both bounds hold.
        if len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            now = self._clock()
            for stale in [k for k, (_, expires) in self._entries.items() if expires <= now]:
                self._drop(stale)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def flush(self) -> int:
        removed = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return removed

    async def entry_stats(self) -> EntryStats:
        now = self._clock()
        for stale in [k for k, (_, expires) in self._entries.items() if expires <= now]:
            self._drop(stale)
        return EntryStats(self._hits, self._misses, len(self._entries), self._bytes)

    async def add(self, increments: Mapping[str, int], ttl_seconds: float, read: Sequence[str] = ()) -> list[int]:
        now = self._clock()
        if len(self._counters) > 10_000:
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        for key, amount in increments.items():
            value, expires = self._counters.get(key, (0, 0.0))
            if expires <= now:
                value, expires = 0, now + ttl_seconds
            self._counters[key] = (value + amount, expires)
        values = []
        for key in read:
            value, expires = self._counters.get(key, (0, 0.0))
            values.append(value if expires > now else 0)
        return values

    async def seed(self, key: str, value: int, ttl_seconds: float) -> int:
        now = self._clock()
        current, expires = self._counters.get(key, (0, 0.0))
        if expires <= now:
            current, expires = value, now + ttl_seconds
            self._counters[key] = (current, expires)
        return current

    async def get_value(self, key: str) -> bytes | None:
        return self._values.get(key)

    async def put_value(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = value

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# One round trip, atomic: the entry and the hit or miss it counts.
LOOKUP_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('INCR', KEYS[2]) else redis.call('INCR', KEYS[3]) end
return value
"""


class RedisBackend:
    """A Redis-protocol server behind a timeout and a degraded/recovering state."""

    name = "redis"

    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = settings.redis_timeout_seconds
        self.retry_seconds = settings.cache_redis_retry_seconds
        self.warning_interval = settings.cache_warning_interval_seconds
        self._clock = clock
        # redis-py's own retries and timeouts are off or short: this class decides what a failure means.
        self.client = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=max(self.timeout, 0.05) * 4,
            socket_connect_timeout=max(self.timeout, 0.05) * 4, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, health_check_interval=0, max_connections=64,
        )
        self._lookup = self.client.register_script(LOOKUP_SCRIPT)
        self.degraded = False
        self.last_error = ""
        self._retry_at = 0.0
        self._last_warning: float | None = None
        self._last_stats = EntryStats()

    async def _run(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Runs one round trip under the timeout; failures mark the backend degraded."""
        if self.degraded and self._clock() < self._retry_at:
            raise BackendUnavailable(self.last_error)
        try:
            async with asyncio.timeout(self.timeout):
                result = await op()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(what, exc)
            raise BackendUnavailable(self.last_error) from None
        if self.degraded:
            self.degraded = False
            log.warning("redis is reachable again; the cache is back in use", extra={"fields": {"op": what}})
        return result

    def _failed(self, what: str, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.labels(what).inc()
        if isinstance(exc, TimeoutError):
            error = f"{what}: no answer within {self.timeout * 1000:.0f} ms"
        else:
            error = f"{what}: {type(exc).__name__}: {exc}"
        now = self._clock()
        self.degraded = True
        self.last_error = error
        self._retry_at = now + self.retry_seconds
        if self._last_warning is None or now - self._last_warning >= self.warning_interval:
            self._last_warning = now
            log.warning("redis is unavailable; bypassing the cache (answers are generated, requests allowed)",
                        extra={"fields": {"error": error, "next_warning_in_s": self.warning_interval}})

    async def lookup(self, key: str) -> bytes | None:
        value = await self._run("lookup", lambda: self._lookup(keys=[key, HITS_KEY, MISSES_KEY]))
        return bytes(value) if value is not None else None

    async def store(self, key: str, value: bytes, ttl_seconds: float) -> None:
        await self._run("store", lambda: self.client.set(key, value, px=max(1, int(ttl_seconds * 1000))))

    async def _scan(self, what: str, batch: Callable[[list[bytes]], Awaitable[Any]]) -> None:
        """SCANs the entry keys, one round trip per batch, each under the timeout."""
        cursor: int = 0
        while True:
            cursor, keys = await self._run(
                what, lambda c=cursor: self.client.scan(c, match=ENTRY_PREFIX + "*", count=SCAN_BATCH))
            if keys:
                await batch(keys)
            if int(cursor) == 0:
                return

    async def flush(self) -> int:
        removed = 0

        async def unlink(keys: list[bytes]) -> None:
            nonlocal removed
            removed += int(await self._run("flush", lambda: self.client.unlink(*keys)))

        await self._scan("flush", unlink)
        return removed

    async def entry_stats(self) -> EntryStats:
        """Counts by SCAN: accurate under TTL expiry and Redis's own eviction, O(entries) per call."""
        counts = await self._run("stats", lambda: self.client.mget(HITS_KEY, MISSES_KEY))
        hits, misses = (int(v or 0) for v in counts)
        entries = total = 0

        async def measure(keys: list[bytes]) -> None:
            nonlocal entries, total

            async def lengths() -> list[int]:
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.strlen(key)
                return list(await pipe.execute())

            sizes = await self._run("stats", lengths)
            live = [s for s in sizes if s]
            entries += len(live)
            total += sum(live) + sum(len(k) for k, s in zip(keys, sizes, strict=True) if s)

        await self._scan("stats", measure)
        self._last_stats = EntryStats(hits, misses, entries, total)
        return self._last_stats

    @property
    def last_known_stats(self) -> EntryStats:
        return self._last_stats

    async def add(self, increments: Mapping[str, int], ttl_seconds: float, read: Sequence[str] = ()) -> list[int]:
        ttl_ms = max(1, int(ttl_seconds * 1000))

        async def op() -> list[int]:
            pipe = self.client.pipeline(transaction=True)
            for key, amount in increments.items():
                pipe.incrby(key, amount)
                pipe.pexpire(key, ttl_ms)
            if read:
                pipe.mget(*read)
            results = await pipe.execute()
            return [int(v or 0) for v in results[-1]] if read else []

        return await self._run("rate limit", op)

    async def seed(self, key: str, value: int, ttl_seconds: float) -> int:
        async def op() -> int:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(key, value, nx=True, px=max(1, int(ttl_seconds * 1000)))
            pipe.get(key)
            return int((await pipe.execute())[-1] or 0)

        return await self._run("rate limit", op)

    async def get_value(self, key: str) -> bytes | None:
        value = await self._run("read", lambda: self.client.get(key))
        return bytes(value) if value is not None else None

    async def put_value(self, key: str, value: bytes | None) -> None:
        if value is None:
            await self._run("write", lambda: self.client.delete(key))
        else:
            await self._run("write", lambda: self.client.set(key, value))

    async def ping(self) -> None:
        await self._run("ping", self.client.ping)

    async def close(self) -> None:
        await self.client.aclose()


def open_backend(settings: CacheSettings) -> Backend:
    if settings.redis_url:
        return RedisBackend(settings)
    return MemoryBackend(settings.cache_max_entries, settings.cache_max_bytes)
