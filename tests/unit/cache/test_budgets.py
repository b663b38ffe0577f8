"""Token budgets: UTC calendar periods and their resets, Retry-After until the reset, an answer that
crosses the budget, overrides (0 = unlimited), the use shown, and counters re-seeded from the
ledger after the backend lost them; on the in-process backend and on a real valkey-server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.cache.backends import Backend, MemoryBackend
from services.cache.budget import INSUFFICIENT_QUOTA, period_of
from services.cache.ratelimit import RateLimiter
from services.cache.settings import CacheSettings
from tests.unit.cache.conftest import Clock


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def limiter(backend: Backend, clock: Clock, ledger_sum=None, **limits: int) -> RateLimiter:
    settings = CacheSettings(**{"rate_limit_requests_per_minute": 0, "rate_limit_tokens_per_minute": 0, **limits})
    return RateLimiter(backend, settings, clock=clock, ledger_sum=ledger_sum)


def test_periods_are_utc_calendar_days_and_months() -> None:
    day = period_of("day", at("2026-12-31T23:59:59"))
    assert (day.key, day.start.isoformat(), day.end.isoformat()) == (
        "20261231", "2026-12-31T00:00:00+00:00", "2027-01-01T00:00:00+00:00")
    assert day.seconds_left(at("2026-12-31T23:59:59")) == 1
    assert day.seconds_left(at("2026-12-31T23:59:59.2")) == 1  # never 0: a client retrying at once waits
    month = period_of("month", at("2028-02-10T12:00:00"))  # a leap year's February
    assert (month.key, month.end.isoformat()) == ("202802", "2028-03-01T00:00:00+00:00")
    assert month.seconds_left(at("2028-02-29T00:00:00")) == 24 * 3600
    assert period_of("month", at("2026-12-01T00:00:00")).end.isoformat() == "2027-01-01T00:00:00+00:00"
    with pytest.raises(ValueError):
        period_of("week", 0)


async def test_a_used_up_day_refuses_until_midnight_utc(backend: Backend) -> None:
    clock = Clock(at("2026-12-06T22:00:00"))
    rl = limiter(backend, clock, rate_limit_tokens_per_day=100)
    assert (await rl.check("u", "k")).allowed
    await rl.record("u", "k", 90)
    assert (await rl.check("u")).allowed  # 10 left: the request may start...
    await rl.record("u", "", 50)  # ...and its answer crosses the budget: it finishes and counts whole
    refused = await rl.check("u", "k")
    assert not refused.allowed and refused.code == INSUFFICIENT_QUOTA
    assert refused.retry_after_seconds == 2 * 3600
    assert "100 tokens per day" in refused.reason and "140 used" in refused.reason
    assert "2026-12-07T00:00:00Z" in refused.reason
    assert (await rl.check("someone-else")).allowed
    clock.now = at("2026-12-07T00:00:01")  # a new day
    assert (await rl.check("u")).allowed


async def test_the_month_outlasts_the_day_in_retry_after(backend: Backend) -> None:
    clock = Clock(at("2026-12-30T12:00:00"))
    rl = limiter(backend, clock, rate_limit_tokens_per_day=50, rate_limit_tokens_per_month=60)
    await rl.record("u", "", 55)
    refused = await rl.check("u")
    assert "per day" in refused.reason and refused.retry_after_seconds == 12 * 3600
    clock.now = at("2026-12-31T12:00:00")  # the day reset, the month did not
    await rl.record("u", "", 10)
    refused = await rl.check("u")
    assert "per month" in refused.reason and refused.retry_after_seconds == 12 * 3600
    assert not refused.allowed and refused.code == INSUFFICIENT_QUOTA
    clock.now = at("2027-01-01T00:00:00")
    assert (await rl.check("u")).allowed


async def test_a_refused_request_costs_no_request_of_the_minute(backend: Backend) -> None:
    clock = Clock(at("2026-12-06T10:00:00"))
    rl = limiter(backend, clock, rate_limit_requests_per_minute=2, rate_limit_tokens_per_day=10)
    await rl.record("u", "", 10)
    for _ in range(5):
        assert (await rl.check("u")).code == INSUFFICIENT_QUOTA
    await rl.update("u", 0, 0, tokens_per_day=0)  # unlimited for this user
    assert [(await rl.check("u")).allowed for _ in range(3)] == [True, True, False]
    assert (await rl.check("u")).code == "rate_limit_exceeded"


async def test_overrides_and_the_use_shown(backend: Backend) -> None:
    clock = Clock(at("2026-12-06T10:00:00"))
    rl = limiter(backend, clock, rate_limit_tokens_per_day=1000)
    await rl.record("u", "k", 30)
    limits = await rl.update("u", 0, 0, tokens_per_month=500)
    assert (limits.limits.tokens_per_day, limits.limits.tokens_per_month, limits.overridden) == (1000, 500, True)
    day, month = await rl.budget_uses(limits)
    assert (day.period.name, day.limit, day.used, day.remaining) == ("day", 1000, 30, 970)
    assert (month.period.name, month.limit, month.used, month.remaining) == ("month", 500, 30, 470)
    assert month.period.end == datetime(2027, 1, 1, tzinfo=UTC)
    limits = await rl.update("u", 0, 0)  # None: both budgets kept
    assert (limits.limits.tokens_per_day, limits.limits.tokens_per_month) == (1000, 500)
    limits = await rl.update("u", 0, 0, tokens_per_day=0, tokens_per_month=-1)
    assert (limits.limits.tokens_per_day, limits.limits.tokens_per_month, limits.overridden) == (0, 0, True)
    assert not (await rl.budget_uses(limits))[0].exhausted  # unlimited
    limits = await rl.update("u", 0, 0, tokens_per_day=-1)
    assert (limits.limits.tokens_per_day, limits.overridden) == (1000, False)


async def test_counters_lost_by_the_backend_are_seeded_from_the_ledger(backend: Backend) -> None:
    clock = Clock(at("2026-12-06T10:00:00"))
    asked: list[tuple[str, str]] = []

    async def ledger_sum(user_id: str, start: datetime, end: datetime) -> int:
        asked.append((user_id, f"{start:%Y-%m-%d}..{end:%Y-%m-%d}"))
        return 120 if end.day == 7 else 400  # the day's and the month's durable use

    rl = limiter(backend, clock, ledger_sum, rate_limit_tokens_per_day=100, rate_limit_tokens_per_month=1000)
    refused = await rl.check("u")
    assert refused.code == INSUFFICIENT_QUOTA and "120 used" in refused.reason
    assert sorted(asked) == [("u", "2026-12-01..2027-01-01"), ("u", "2026-12-06..2026-12-07")]
    day, month = await rl.budget_uses(await rl.limits_for("u"))
    assert (day.used, month.used) == (120, 400)  # seeded into the backend: no second question
    assert len(asked) == 2
    # A user without durable use is asked about once a minute, not on every request.
    fresh = limiter(MemoryBackend(10, 10_000), clock, lambda *_: _zero(asked), rate_limit_tokens_per_day=100)
    for _ in range(3):
        assert (await fresh.check("v")).allowed
    assert len(asked) == 2 + 2


async def _zero(asked: list) -> int:
    asked.append(("v", ""))
    return 0


async def test_a_ledger_that_cannot_answer_fails_no_request() -> None:
    async def unreachable(user_id: str, start: datetime, end: datetime) -> int:
        raise OSError("database unreachable")

    rl = limiter(MemoryBackend(10, 10_000), Clock(at("2026-12-06T10:00:00")), unreachable, rate_limit_tokens_per_day=5)
    assert (await rl.check("u")).allowed
    await rl.record("u", "", 5)
    assert (await rl.check("u")).code == INSUFFICIENT_QUOTA  # counted from zero meanwhile
