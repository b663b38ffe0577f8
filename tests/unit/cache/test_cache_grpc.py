"""The cache service in-process over gRPC, called through CacheClient exactly as session and
inference call it: credentials forwarded, identity checked on the cache side, admin guards, and a
client that never fails a chat when the cache service is gone."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from parley.cache.v1 import cache_pb2, cache_pb2_grpc
from parley.inference.v1 import inference_pb2 as pb

from services.cache.app import build
from services.cache.client import CacheClient
from services.cache.settings import CacheSettings
from services.core import identity
from services.core.config import CommonSettings, DatabaseSettings
from services.core.errors import QuotaExceeded, ResourceExhausted, Unauthenticated
from services.core.identity import CredentialVerifier, Identity, IdentitySettings
from services.core.server import RunningServer, start_server
from tests.redis_server import RedisServer, free_port

PEOPLE = {
    "pk-alice": Identity("u-alice", "alice", frozenset({"user"}), api_key_id="key-alice"),
    "pk-bob": Identity("u-bob", "bob", frozenset({"user"})),
    "pk-root": Identity("u-root", "root", frozenset({"user", "admin"})),
}


async def no_jwks() -> list:
    return []


async def api_key(secret: str) -> Identity:
    if secret not in PEOPLE:
        raise Unauthenticated("unknown API key")
    return PEOPLE[secret]


@contextlib.contextmanager
def signed_in(secret: str) -> Iterator[None]:
    """As inside an RPC handler of a service that authenticated this caller."""
    token = identity._current.set(Identity(**{**PEOPLE[secret].__dict__, "credential": secret}))
    try:
        yield
    finally:
        identity._current.reset(token)


async def start(settings: CacheSettings, data_dir: Path) -> RunningServer:
    verifier = CredentialVerifier(no_jwks, api_key, IdentitySettings(api_key_cache_seconds=0))
    spec = await build(CommonSettings(data_dir=data_dir), settings, verifier=verifier,
                       database_settings=DatabaseSettings())
    return await start_server(spec, port=0)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start(CacheSettings(rate_limit_requests_per_minute=3, rate_limit_tokens_per_minute=100), tmp_path)
    yield running
    await running.stop(0)


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[CacheClient]:
    c = CacheClient(CommonSettings(cache_port=server.port))
    yield c
    await c.close()


def key(text: str = "Hi", **sampling) -> cache_pb2.CompletionKey:
    sampling.setdefault("temperature", 0.0)
    return cache_pb2.CompletionKey(model="m", model_fingerprint="1-2", messages=[pb.ChatMessage(role="user", content=text)],
                                   sampling=pb.SamplingParams(**sampling))


ANSWER = cache_pb2.CachedCompletion(text="Hello!", finish_reason=pb.FINISH_REASON_STOP,
                                    usage=pb.Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7))


async def test_miss_store_hit_and_stats(client: CacheClient, server: RunningServer) -> None:
    with signed_in("pk-alice"):
        assert await client.lookup(key()) is None
        assert await client.store(key(), ANSWER) is True
        assert await client.lookup(key()) == ANSWER
    with signed_in("pk-bob"):  # the default scope is global: another user gets the same answer
        assert await client.lookup(key()) == ANSWER
        assert await client.store(key(temperature=0.7), ANSWER) is False  # not deterministic
        assert await client.lookup(key(temperature=0.7)) is None
        incomplete = cache_pb2.CachedCompletion(text="Hel", finish_reason=pb.FINISH_REASON_CANCELLED)
        assert await client.store(key("other"), incomplete) is False
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stats = await cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(
            cache_pb2.GetCacheStatsRequest(), metadata=(("authorization", "Bearer pk-bob"),))
    assert (stats.backend, stats.hits, stats.misses, stats.entries, stats.degraded) == ("memory", 2, 1, 1, False)
    assert stats.hit_ratio == pytest.approx(2 / 3) and stats.bytes > len(ANSWER.SerializeToString())


async def test_rate_limit_raises_resource_exhausted_with_retry_after(client: CacheClient) -> None:
    with signed_in("pk-bob"):
        for _ in range(3):
            await client.check_rate_limit()
        with pytest.raises(ResourceExhausted) as raised:
            await client.check_rate_limit()
    assert raised.value.retry_after is not None and raised.value.retry_after >= 1
    assert "3 requests per minute" in raised.value.message
    with signed_in("pk-alice"):
        await client.check_rate_limit()
        await client.record_usage("m", 400, 100)  # over the 100 tokens per minute
        with pytest.raises(ResourceExhausted, match="tokens per minute"):
            await client.check_rate_limit()


async def test_callers_cannot_charge_or_read_someone_else(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        limits = cache_pb2_grpc.RateLimitServiceStub(channel)
        public = cache_pb2_grpc.CacheServiceStub(channel)
        bob = (("authorization", "Bearer pk-bob"),)
        root = (("authorization", "Bearer pk-root"),)
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await limits.CheckRateLimit(cache_pb2.CheckRateLimitRequest(user_id="u-alice"), metadata=bob)
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await limits.CheckRateLimit(cache_pb2.CheckRateLimitRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED

        mine = await public.GetRateLimit(cache_pb2.GetRateLimitRequest(user_id="me"), metadata=bob)
        assert (mine.user_id, mine.requests_per_minute, mine.overridden) == ("u-bob", 3, False)
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await public.GetRateLimit(cache_pb2.GetRateLimitRequest(user_id="u-alice"), metadata=bob)
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for admin_only in (public.FlushCache(cache_pb2.FlushCacheRequest(), metadata=bob),
                           public.UpdateRateLimit(cache_pb2.UpdateRateLimitRequest(
                               rate_limit=cache_pb2.RateLimit(user_id="u-bob", requests_per_minute=1000)), metadata=bob)):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin_only
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        updated = await public.UpdateRateLimit(cache_pb2.UpdateRateLimitRequest(
            rate_limit=cache_pb2.RateLimit(user_id="u-bob", requests_per_minute=1)), metadata=root)
        assert (updated.requests_per_minute, updated.tokens_per_minute, updated.overridden) == (1, 100, True)
        seen_by_admin = await public.GetRateLimit(cache_pb2.GetRateLimitRequest(user_id="u-bob"), metadata=root)
        assert seen_by_admin == updated
        assert (await limits.CheckRateLimit(cache_pb2.CheckRateLimitRequest(), metadata=bob)).allowed
        refused = await limits.CheckRateLimit(cache_pb2.CheckRateLimitRequest(), metadata=bob)
        assert not refused.allowed and refused.retry_after_seconds >= 1
        assert (await public.FlushCache(cache_pb2.FlushCacheRequest(), metadata=root)).removed == 0


async def test_client_goes_on_without_the_cache_service() -> None:
    client = CacheClient(CommonSettings(cache_port=free_port()))  # nothing listens there
    try:
        with signed_in("pk-alice"):
            started = time.monotonic()
            assert await client.lookup(key()) is None
            assert await client.store(key(), ANSWER) is False
            await client.check_rate_limit()  # allowed
            await client.record_usage("m", 10, 0)
            assert time.monotonic() - started < 2.0
    finally:
        await client.close()


async def test_redis_down_is_degraded_not_an_error(tmp_path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    running = await start(CacheSettings(redis_url=redis.url, cache_redis_retry_seconds=0.1), tmp_path)
    client = CacheClient(CommonSettings(cache_port=running.port))
    stats_call = cache_pb2_grpc.CacheServiceStub(grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")).GetCacheStats
    me = (("authorization", "Bearer pk-alice"),)
    try:
        with signed_in("pk-alice"):
            assert await client.store(key(), ANSWER)
            redis.kill()
            assert await running.spec.ready() is None  # start-up does not wait for Redis either
            assert await client.lookup(key()) is None  # bypassed: generation goes on
            await client.check_rate_limit()  # allowed
            stats = await stats_call(cache_pb2.GetCacheStatsRequest(), metadata=me)
            assert stats.backend == "redis" and stats.degraded and stats.last_error
            redis.start()
            time.sleep(0.15)
            assert await client.store(key(), ANSWER)
            assert await client.lookup(key()) == ANSWER
            stats = await stats_call(cache_pb2.GetCacheStatsRequest(), metadata=me)
            assert not stats.degraded and stats.entries == 1
    finally:
        await client.close()
        await running.stop(0)
        redis.stop()


async def test_budgets_and_usage_over_grpc(client: CacheClient, server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        public = cache_pb2_grpc.CacheServiceStub(channel)
        bob = (("authorization", "Bearer pk-bob"),)
        root = (("authorization", "Bearer pk-root"),)
        budget = cache_pb2.RateLimit(user_id="u-alice", tokens_per_day=50)
        updated = await public.UpdateRateLimit(cache_pb2.UpdateRateLimitRequest(rate_limit=budget), metadata=root)
        assert (updated.tokens_per_day, updated.tokens_per_month, updated.overridden) == (50, 0, True)
        assert [(b.period, b.limit, b.used) for b in updated.budgets] == [("day", 50, 0), ("month", 0, 0)]
        with signed_in("pk-alice"):
            await client.check_rate_limit()
            await client.record_usage("m", 30, 30, cached_prompt_tokens=10)
            await client.record_usage("m", 5, 5, cached=True)  # a replayed answer: no budget counts it
            with pytest.raises(QuotaExceeded) as refused:
                await client.check_rate_limit()
        assert "50 tokens per day" in refused.value.message and refused.value.retry_after >= 1
        alice = await public.GetRateLimit(cache_pb2.GetRateLimitRequest(user_id="u-alice"), metadata=root)
        day = alice.budgets[0]
        assert (day.used, day.remaining) == (60, 0) and day.reset_time.seconds % 86_400 == 0

        mine = await public.GetUsage(cache_pb2.GetUsageRequest(user_id="u-alice", group_by=["model"]), metadata=root)
        today = mine.data[-1].results[0]
        assert (today.model, today.input_tokens, today.output_tokens, today.input_cached_tokens) == ("m", 30, 30, 10)
        assert (today.num_model_requests, today.num_cached_requests, today.cached_tokens) == (1, 1, 10)
        assert mine.object == "page" and not mine.has_more and mine.next_page.WhichOneof("kind") == "null_value"
        assert not (await public.GetUsage(cache_pb2.GetUsageRequest(), metadata=bob)).data[-1].results
        everyone = await public.GetUsage(cache_pb2.GetUsageRequest(user_id="*", group_by=["user_id"]), metadata=root)
        assert [r.user_id for r in everyone.data[-1].results] == ["u-alice"]
        for whose in ("u-alice", "*"):
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await public.GetUsage(cache_pb2.GetUsageRequest(user_id=whose), metadata=bob)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_admin_sets_a_users_share_weight_and_rate_limit_checks_carry_it(client: CacheClient,
                                                                                 server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        public = cache_pb2_grpc.CacheServiceStub(channel)
        root = (("authorization", "Bearer pk-root"),)

        async def update(**fields: object) -> cache_pb2.RateLimit:
            limit = cache_pb2.RateLimit(user_id="u-bob", **fields)
            return await public.UpdateRateLimit(cache_pb2.UpdateRateLimitRequest(rate_limit=limit), metadata=root)

        with signed_in("pk-bob"):
            assert await client.check_rate_limit() == 1.0
        assert (await update(share_weight=2.5)).share_weight == 2.5
        assert (await update(requests_per_minute=50)).share_weight == 2.5  # left out: kept
        with signed_in("pk-bob"):
            assert await client.check_rate_limit() == 2.5
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await update(share_weight=1e9)
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "share_weight" in too_big.value.details()
        assert (await update(share_weight=0)).share_weight == 1.0
        bob = (("authorization", "Bearer pk-bob"),)
        with pytest.raises(grpc.aio.AioRpcError) as not_admin:
            await public.UpdateRateLimit(cache_pb2.UpdateRateLimitRequest(
                rate_limit=cache_pb2.RateLimit(user_id="u-bob", share_weight=9)), metadata=bob)
        assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
