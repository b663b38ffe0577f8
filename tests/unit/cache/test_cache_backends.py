"""Backends: the in-process LRU's bounds and expiry, and Redis (a real valkey-server) with its
timeout, degraded state, rate-limited warnings and recovery after a kill/restart or a pause."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import pytest

from services.cache.backends import ENTRY_PREFIX, BackendUnavailable, MemoryBackend, RedisBackend
from services.cache.settings import CacheSettings
from tests.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_lru_evicts_least_recently_used_beyond_max_entries() -> None:
    lru = MemoryBackend(max_entries=3, max_bytes=10_000)
    for name in "abc":
        await lru.store(name, b"v", 60)
    assert await lru.lookup("a") == b"v"  # a is now the most recently used
    await lru.store("d", b"v", 60)
    assert await lru.lookup("b") is None
    assert [await lru.lookup(k) for k in "acd"] == [b"v"] * 3
    assert (await lru.entry_stats()).entries == 3


async def test_lru_total_bytes_stay_under_max_bytes() -> None:
    lru = MemoryBackend(max_entries=1000, max_bytes=1000)
    for i in range(50):
        await lru.store(f"k{i:02d}", b"x" * 97, 60)  # 100 bytes each with the key
        assert (await lru.entry_stats()).bytes <= 1000
    stats = await lru.entry_stats()
    assert stats.entries == 10 and stats.bytes == 1000
    assert await lru.lookup("k49") is not None and await lru.lookup("k00") is None
    await lru.store("huge", b"x" * 2000, 60)  # larger than the whole cache: not stored, nothing evicted
    assert await lru.lookup("huge") is None and (await lru.entry_stats()).entries == 10


async def test_lru_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    lru = MemoryBackend(max_entries=10, max_bytes=10_000, clock=clock)
    await lru.store("k", b"v", 30)
    clock.now += 29
    assert await lru.lookup("k") == b"v"
    clock.now += 2
    assert await lru.lookup("k") is None
    stats = await lru.entry_stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (1, 1, 0, 0)


async def test_lru_replacing_an_entry_keeps_the_byte_count_right() -> None:
    lru = MemoryBackend(max_entries=10, max_bytes=10_000)
    await lru.store("k", b"x" * 100, 60)
    await lru.store("k", b"x" * 10, 60)
    assert (await lru.entry_stats()).bytes == 11
    assert await lru.flush() == 1 and (await lru.entry_stats()).bytes == 0


def redis_settings(server: RedisServer, **changes: object) -> CacheSettings:
    base = CacheSettings(redis_url=server.url, cache_redis_retry_seconds=0.2, cache_warning_interval_seconds=60)
    return dataclasses.replace(base, **changes)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(redis_settings(redis_server))
    yield backend
    await backend.close()


async def test_redis_stores_counts_hits_and_flushes(redis: RedisBackend) -> None:
    assert await redis.lookup(ENTRY_PREFIX + "a") is None
    await redis.store(ENTRY_PREFIX + "a", b"12345", 60)
    await redis.store(ENTRY_PREFIX + "b", b"1", 60)
    assert await redis.lookup(ENTRY_PREFIX + "a") == b"12345"
    stats = await redis.entry_stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 2)
    assert stats.bytes == 6 + 2 * len(ENTRY_PREFIX + "a")
    assert await redis.flush() == 2
    assert (await redis.entry_stats()).entries == 0
    assert not redis.degraded


async def test_redis_entries_expire(redis: RedisBackend) -> None:
    await redis.store(ENTRY_PREFIX + "short", b"v", 0.15)
    assert await redis.lookup(ENTRY_PREFIX + "short") == b"v"
    await asyncio.sleep(0.3)
    assert await redis.lookup(ENTRY_PREFIX + "short") is None


async def test_redis_killed_bypasses_then_recovers_by_itself(redis: RedisBackend, redis_server: RedisServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    await redis.store(ENTRY_PREFIX + "k", b"v", 60)
    redis_server.kill()
    caplog.set_level(logging.WARNING, logger="parley.cache")
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(BackendUnavailable):
            await redis.lookup(ENTRY_PREFIX + "k")
    assert time.monotonic() - started < 1.0  # each failure is fast: no retries, no long waits
    assert redis.degraded and redis.last_error
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per interval, not once per failure

    redis_server.start()  # a fresh, empty server on the same port
    await asyncio.sleep(0.25)  # the retry period passes
    assert await redis.lookup(ENTRY_PREFIX + "k") is None
    assert not redis.degraded
    await redis.store(ENTRY_PREFIX + "k", b"again", 60)
    assert await redis.lookup(ENTRY_PREFIX + "k") == b"again"


async def test_redis_slower_than_the_timeout_is_bypassed_within_it(redis: RedisBackend,
                                                                    redis_server: RedisServer) -> None:
    await redis.store(ENTRY_PREFIX + "k", b"v", 60)
    redis_server.pause()  # accepts, never answers
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await redis.lookup(ENTRY_PREFIX + "k")
        assert time.monotonic() - started < 0.2  # the 50 ms default, plus scheduling slack
        assert redis.degraded and "50 ms" in redis.last_error
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):  # within the retry period: not even tried
            await redis.lookup(ENTRY_PREFIX + "k")
        assert time.monotonic() - started < 0.04  # not tried: well under the 50 ms a try would wait
    finally:
        redis_server.resume()
    await asyncio.sleep(0.25)
    assert await redis.lookup(ENTRY_PREFIX + "k") == b"v"
    assert not redis.degraded


async def test_redis_warnings_repeat_after_the_interval(redis_server: RedisServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    backend = RedisBackend(redis_settings(redis_server, cache_redis_retry_seconds=0,
                                          cache_warning_interval_seconds=0.2))
    redis_server.kill()
    caplog.set_level(logging.WARNING, logger="parley.cache")
    try:
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                await backend.ping()
        await asyncio.sleep(0.25)
        with pytest.raises(BackendUnavailable):
            await backend.ping()
    finally:
        await backend.close()
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 2


async def test_redis_counters_add_and_read_in_one_round_trip(redis: RedisBackend) -> None:
    assert await redis.add({"parley:c:a": 2, "parley:c:b": 5}, 60, ["parley:c:a", "parley:c:b", "parley:c:z"]) \
        == [2, 5, 0]
    assert await redis.add({"parley:c:a": -1}, 60, ["parley:c:a"]) == [1]
    assert 0 < await redis.client.pttl("parley:c:a") <= 60_000
    await redis.put_value("parley:v", b"x")
    assert await redis.get_value("parley:v") == b"x"
    await redis.put_value("parley:v", None)
    assert await redis.get_value("parley:v") is None
