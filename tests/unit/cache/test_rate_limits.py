"""Rate limits: the sliding window per user and per API key, Retry-After, tokens, overrides; on the
in-process backend and on a real valkey-server."""

from __future__ import annotations

import pytest

from services.cache.backends import Backend
from services.cache.ratelimit import RateLimiter, seconds_until_room
from services.cache.settings import CacheSettings
from tests.unit.cache.conftest import Clock


MINUTE_START = 1_700_000_040.0  # a multiple of 60


def limiter(backend: Backend, clock: Clock, **limits: int) -> RateLimiter:
    settings = CacheSettings(**{"rate_limit_requests_per_minute": 3, "rate_limit_tokens_per_minute": 1000, **limits})
    return RateLimiter(backend, settings, clock=clock)


async def test_requests_per_minute_then_retry_after(backend: Backend) -> None:
    clock = Clock(MINUTE_START + 30)
    rl = limiter(backend, clock)
    assert [(await rl.check("u1")).allowed for _ in range(3)] == [True] * 3
    refused = await rl.check("u1")
    assert not refused.allowed and "3 requests per minute" in refused.reason
    # Three in the current minute: they leave the window gradually during the next minute.
    assert 30 < refused.retry_after_seconds <= 60
    assert (await rl.check("u2")).allowed  # other users are not affected
    clock.now += refused.retry_after_seconds
    assert (await rl.check("u1")).allowed


async def test_refused_requests_do_not_count(backend: Backend) -> None:
    clock = Clock(MINUTE_START)
    rl = limiter(backend, clock, rate_limit_requests_per_minute=5, rate_limit_api_key_requests_per_minute=1)
    assert (await rl.check("u", "k")).allowed
    for _ in range(5):
        assert not (await rl.check("u", "k")).allowed  # the key is over; the user is not charged
    assert [(await rl.check("u")).allowed for _ in range(5)] == [True] * 4 + [False]


async def test_window_slides_instead_of_resetting_at_the_minute(backend: Backend) -> None:
    clock = Clock(MINUTE_START + 59)
    rl = limiter(backend, clock, rate_limit_requests_per_minute=4)
    for _ in range(4):
        assert (await rl.check("u")).allowed
    clock.now = MINUTE_START + 61  # a fixed window would allow 4 more right away
    assert (await rl.check("u")).allowed  # floor(4 * 59/60) = 3 still in the window
    assert not (await rl.check("u")).allowed
    clock.now = MINUTE_START + 60 + 20  # a third of the previous minute has left: floor(4 * 2/3) = 2
    assert (await rl.check("u")).allowed
    assert not (await rl.check("u")).allowed


async def test_tokens_per_minute(backend: Backend) -> None:
    clock = Clock(MINUTE_START + 10)
    rl = limiter(backend, clock, rate_limit_requests_per_minute=100, rate_limit_tokens_per_minute=100)
    assert (await rl.check("u", "k1")).allowed
    await rl.record("u", "k1", 150)  # one answer may overshoot; the next request waits
    refused = await rl.check("u", "k2")
    assert not refused.allowed and "100 tokens per minute" in refused.reason and "your account" in refused.reason
    assert refused.retry_after_seconds > 50


async def test_api_keys_have_their_own_limit_within_the_users(backend: Backend) -> None:
    clock = Clock(MINUTE_START)
    rl = limiter(backend, clock, rate_limit_requests_per_minute=5, rate_limit_api_key_requests_per_minute=2)
    assert (await rl.check("u", "k1")).allowed and (await rl.check("u", "k1")).allowed
    refused = await rl.check("u", "k1")
    assert not refused.allowed and "this API key" in refused.reason
    assert (await rl.check("u", "k2")).allowed  # another key of the same user
    assert (await rl.check("u")).allowed  # the user's own sign-in: 4 of 5 counted
    assert (await rl.check("u", "k3")).allowed
    refused = await rl.check("u", "k4")  # the user's limit covers all their keys
    assert not refused.allowed and "your account" in refused.reason


async def test_unlimited_when_zero(backend: Backend) -> None:
    rl = limiter(backend, Clock(MINUTE_START), rate_limit_requests_per_minute=0, rate_limit_tokens_per_minute=0)
    for _ in range(20):
        assert (await rl.check("u")).allowed
    await rl.record("u", "", 10**9)
    assert (await rl.check("u")).allowed


async def test_admin_overrides_per_user(backend: Backend) -> None:
    clock = Clock(MINUTE_START)
    rl = limiter(backend, clock)
    assert (await rl.limits_for("u")).overridden is False
    updated = await rl.update("u", 1, 0)  # 0 leaves tokens as they are
    assert (updated.limits.requests_per_minute, updated.limits.tokens_per_minute, updated.overridden) == (1, 1000, True)
    assert (await rl.check("u")).allowed and not (await rl.check("u")).allowed
    assert (await rl.check("someone-else")).allowed
    updated = await rl.update("u", 0, 50)  # a PATCH of one field keeps the other override
    assert (updated.limits.requests_per_minute, updated.limits.tokens_per_minute) == (1, 50)
    updated = await rl.update("u", -1, -1)  # back to the configuration
    assert (updated.limits.requests_per_minute, updated.overridden) == (3, False)


def test_seconds_until_room() -> None:
    assert seconds_until_room(0, 2, 0.5, 3) == 0  # room for one more
    assert seconds_until_room(0, 3, 0.5, 3) == pytest.approx(30, abs=0.02)  # the minute turns
    assert seconds_until_room(0, 6, 0.5, 3) == pytest.approx(30 + 30, abs=0.02)  # and half of it leaves
    assert seconds_until_room(6, 0, 0.0, 3) == pytest.approx(60 * (1 - 3 / 6), abs=0.02)
    assert seconds_until_room(1, 1, 0.0, 1) == pytest.approx(60.0, abs=0.02)
