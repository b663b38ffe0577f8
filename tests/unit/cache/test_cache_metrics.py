"""Cache metrics: lookups count as hits or misses (a bypassed backend is a miss), failed Redis round
trips count as Redis errors by operation."""

from __future__ import annotations

from parley.cache.v1 import cache_pb2
from parley.inference.v1 import inference_pb2 as pb
from prometheus_client import REGISTRY

from services.cache.backends import MemoryBackend, RedisBackend
from services.cache.service import ResponseCache
from services.cache.settings import CacheSettings
from services.stack import free_port
from tests.unit.cache.test_cache_keys import key


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_lookups_count_hits_and_misses() -> None:
    cache = ResponseCache(MemoryBackend(max_entries=10, max_bytes=100_000), CacheSettings())
    hits, misses = sample("parley_cache_hits_total"), sample("parley_cache_misses_total")
    assert await cache.lookup(key(), "u1") is None
    completion = cache_pb2.CachedCompletion(text="Hello", finish_reason=pb.FINISH_REASON_STOP)
    assert await cache.store(key(), completion, "u1")
    assert (await cache.lookup(key(), "u1")).text == "Hello"
    assert sample("parley_cache_misses_total") == misses + 1
    assert sample("parley_cache_hits_total") == hits + 1


async def test_an_unreachable_redis_counts_an_error_and_a_miss() -> None:
    settings = CacheSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", cache_redis_retry_seconds=0)
    backend = RedisBackend(settings)
    cache = ResponseCache(backend, settings)
    errors, misses = sample("parley_cache_redis_errors_total", operation="lookup"), sample("parley_cache_misses_total")
    try:
        assert await cache.lookup(key(), "u1") is None
    finally:
        await backend.close()
    assert sample("parley_cache_redis_errors_total", operation="lookup") == errors + 1
    assert sample("parley_cache_misses_total") == misses + 1
