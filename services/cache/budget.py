"""Token budgets: prompt + completion tokens per user per UTC calendar day and month.

Counters: one per user and period (`parley:budget:tokens:user:<id>:day:20261206`, `…:month:202612`)
in the cache backend, beside the per-minute counters, so that every replica sees the same use. Every
recorded answer adds to both, whether a budget is set or not: a budget set in the middle of a day
already knows the day's use. They expire a while after their period ends.

A request is refused (insufficient_quota, HTTP 429) when a budget in force is used up — used >=
limit — before it runs; an answer that crosses the budget mid-way finishes and is counted whole, so
use may end a little above the limit. Retry-After is the time until the period ends (the later end
when both budgets are used up).

After the backend has lost its counters (an in-process backend restarted, Redis flushed or
restarted without persistence), a counter that reads 0 is seeded from the usage ledger (the
period's durable sum) once, with set-if-absent so that replicas seeding at once agree; the ledger
is asked at most once a minute per counter and replica while the counter stays at 0. While the
ledger's database is unreachable, a lost counter starts from 0 (the request is not failed).
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.cache.backends import PREFIX, Backend

log = logging.getLogger("parley.cache.budget")

PERIODS = ("day", "month")
# Long enough for a monthly counter to outlive its month; a daily one is simply read no more.
COUNTER_TTL_SECONDS = 33 * 24 * 3600
RESEED_INTERVAL_SECONDS = 60.0
INSUFFICIENT_QUOTA = "insufficient_quota"

# A period's durable use from the ledger: (user_id, start, end) -> tokens.
LedgerSum = Callable[[str, datetime, datetime], Awaitable[int]]


@dataclass(frozen=True)
class Period:
    name: str  # "day" or "month"
    start: datetime  # UTC
    end: datetime  # exclusive: when the budget resets

    @property
    def key(self) -> str:
        return self.start.strftime("%Y%m%d" if self.name == "day" else "%Y%m")

    def seconds_left(self, now: float) -> int:
        """Retry-After: whole seconds until the period ends (at least 1)."""
        return max(1, math.ceil(self.end.timestamp() - now))


def period_of(name: str, now: float) -> Period:
    """The UTC calendar day or month holding `now` (unix seconds)."""
    moment = datetime.fromtimestamp(now, UTC)
    if name == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return Period(name, start, start + timedelta(days=1))
    if name == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        return Period(name, start, start + timedelta(days=days))
    raise ValueError(f"unknown budget period {name!r}")


@dataclass(frozen=True)
class BudgetUse:
    """One budget of a user in its current period."""

    period: Period
    limit: int  # 0 = unlimited
    used: int

    @property
    def exhausted(self) -> bool:
        return self.limit > 0 and self.used >= self.limit

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used) if self.limit else 0

    def refusal(self) -> str:
        return (f"token budget of {self.limit} tokens per {self.period.name} (UTC) is used up for your account "
                f"({self.used} used); it resets at {self.period.end.isoformat().replace('+00:00', 'Z')}")


def counter_key(user_id: str, period: Period) -> str:
    return f"{PREFIX}budget:tokens:user:{user_id}:{period.name}:{period.key}"


def refusing(uses: Sequence[BudgetUse]) -> BudgetUse | None:
    """The exhausted budget that keeps the user waiting longest, or None."""
    exhausted = [u for u in uses if u.exhausted]
    return max(exhausted, key=lambda u: u.period.end) if exhausted else None


class TokenBudgets:
    def __init__(self, backend: Backend, ledger_sum: LedgerSum | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.ledger_sum = ledger_sum
        self._clock = clock
        self._seeded: dict[str, float] = {}  # counter -> when the ledger was last asked

    @staticmethod
    def periods(now: float) -> list[Period]:
        return [period_of(name, now) for name in PERIODS]

    async def uses(self, user_id: str, limits: Sequence[int], periods: Sequence[Period],
                   counted: Sequence[int]) -> list[BudgetUse]:
        """The budgets from their counters' values (`counted`, read by the caller in its round
        trip), seeding from the ledger a counter that reads 0."""
        uses = []
        for limit, period, used in zip(limits, periods, counted, strict=True):
            if used <= 0:
                used = await self._seed(user_id, period)
            uses.append(BudgetUse(period, limit, used))
        return uses

    async def _seed(self, user_id: str, period: Period) -> int:
        if self.ledger_sum is None:
            return 0
        key = counter_key(user_id, period)
        now = self._clock()
        last = self._seeded.get(key)
        if last is not None and now - last < RESEED_INTERVAL_SECONDS:
            return 0
        if len(self._seeded) > 10_000:
            self._seeded = {k: t for k, t in self._seeded.items() if now - t < RESEED_INTERVAL_SECONDS}
        self._seeded[key] = now
        try:
            durable = await self.ledger_sum(user_id, period.start, period.end)
        except Exception as exc:  # noqa: BLE001 - the ledger's database down: counted from zero, asked again later
            log.warning("the usage ledger could not seed a token budget",
                        extra={"fields": {"period": period.name, "error": type(exc).__name__}})
            return 0
        if durable <= 0:
            return 0
        return await self.backend.seed(key, durable, COUNTER_TTL_SECONDS)

    async def read(self, user_id: str, limits: Sequence[int], now: float) -> list[BudgetUse]:
        """The user's budgets and their use (GET /v1/rate-limits/…)."""
        periods = self.periods(now)
        counted = await self.backend.add({}, COUNTER_TTL_SECONDS, [counter_key(user_id, p) for p in periods])
        return await self.uses(user_id, limits, periods, counted)

    async def record(self, user_id: str, tokens: int, now: float) -> None:
        await self.backend.add({counter_key(user_id, p): tokens for p in self.periods(now)}, COUNTER_TTL_SECONDS)
