"""Requests and tokens per minute, per user and per API key, counted in the cache backend.

Window: a sliding-window counter. Each subject (a user, or an API key) has one counter per
calendar minute; the estimate for "the last 60 seconds" is the previous minute's count weighted by
the part of it still inside the window, plus the current minute's count:

    estimate = floor(previous * (1 - elapsed_fraction_of_this_minute)) + current

Unlike a fixed window it does not let a client spend twice the limit across a minute boundary, and
unlike a log of timestamps it costs two integers per subject. Counters expire on their own (TTL of
two windows), so nothing needs cleaning.

A request is admitted when it and at least one token still fit: its request counter is incremented
in the same round trip that reads the others (so concurrent requests cannot both take the last
place), and taken back if the request is refused. Tokens are recorded after the answer, so one
answer may overshoot the token budget; the next request then waits. Retry-After is the time until
the estimate has decayed enough to admit one request.

Daily and monthly token budgets (services.cache.budget) are read in the same round trip and refuse
with their own code (insufficient_quota) until the period ends.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.cache.backends import PREFIX, Backend
from services.cache.budget import INSUFFICIENT_QUOTA, BudgetUse, LedgerSum, TokenBudgets, counter_key, refusing
from services.cache.settings import CacheSettings
from services.core.errors import InvalidArgument
from services.core.identity import MAX_SHARE_WEIGHT

WINDOW_SECONDS = 60.0
COUNTER_TTL_SECONDS = 2 * WINDOW_SECONDS + 5
OVERRIDE_PREFIX = PREFIX + "ratelimit:override:"
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
BUDGET_FIELDS = ("tokens_per_day", "tokens_per_month")


@dataclass(frozen=True)
class Limits:
    """Per minute, and token budgets per UTC day and month; 0 means unlimited."""

    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    share_weight: float = 1.0  # in the inference engines' fair share (services.inference.engines.fair)

    @property
    def budgets(self) -> list[int]:
        """In the order of services.cache.budget.PERIODS."""
        return [self.tokens_per_day, self.tokens_per_month]


@dataclass(frozen=True)
class UserLimits:
    user_id: str
    limits: Limits
    overridden: bool


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_seconds: int = 0
    reason: str = ""
    code: str = ""  # RATE_LIMIT_EXCEEDED or INSUFFICIENT_QUOTA when refused
    share_weight: float = 1.0  # the user's, for the request's scheduling


def estimate(previous: int, current: int, fraction: float) -> int:
    # Rounded down, so that a limit of 1 per minute admits again once the minute has turned.
    return math.floor(previous * (1.0 - fraction)) + current


def seconds_until_room(previous: int, current: int, fraction: float, limit: int) -> float:
    """How long until `estimate + 1 <= limit` when nothing more is added (a hair later, so that a
    client retrying exactly then is admitted)."""
    if estimate(previous, current, fraction) + 1 <= limit:
        return 0.0
    if current + 1 <= limit:
        # floor(previous * (1 - f)) <= limit - 1 - current  <=>  f > 1 - (limit - current) / previous
        needed = 1.0 - (limit - current) / previous
        return max(0.0, (needed - fraction) * WINDOW_SECONDS) + 0.01
    # The current minute alone is over: wait for it to become the previous one and decay.
    needed = max(0.0, 1.0 - limit / current)
    return (1.0 - fraction + needed) * WINDOW_SECONDS + 0.01


class RateLimiter:
    def __init__(self, backend: Backend, settings: CacheSettings, clock: Callable[[], float] = time.time,
                 ledger_sum: LedgerSum | None = None) -> None:
        """`ledger_sum` re-seeds budget counters the backend lost (services.cache.budget)."""
        self.backend = backend
        self.settings = settings
        self._clock = clock
        self.budgets = TokenBudgets(backend, ledger_sum)

    @property
    def defaults(self) -> Limits:
        s = self.settings
        return Limits(s.rate_limit_requests_per_minute, s.rate_limit_tokens_per_minute,
                      s.rate_limit_tokens_per_day, s.rate_limit_tokens_per_month)

    async def _override(self, user_id: str) -> dict[str, float]:
        raw = await self.backend.get_value(OVERRIDE_PREFIX + user_id)
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    async def limits_for(self, user_id: str) -> UserLimits:
        override = await self._override(user_id)
        base = self.defaults
        limits = Limits(**{field: override.get(field, getattr(base, field))  # type: ignore[arg-type]
                           for field in Limits.__dataclass_fields__})
        return UserLimits(user_id, limits, bool(override))

    async def update(self, user_id: str, requests_per_minute: int, tokens_per_minute: int,
                     tokens_per_day: int | None = None, tokens_per_month: int | None = None,
                     share_weight: float | None = None) -> UserLimits:
        """A per-user override. Per minute: > 0 sets it, 0 keeps what is in force (a PATCH that leaves
        a field out), < 0 returns it to the configured default. Budgets: None keeps, 0 makes it
        unlimited, > 0 sets, < 0 returns to the default. The fair-share weight: None keeps, > 0 sets,
        <= 0 returns to 1. With no field left overridden the override is removed."""
        if not user_id:
            raise InvalidArgument("rate_limit.user_id is required")
        override = await self._override(user_id)
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value > 0:
                override[name] = value
            elif value < 0:
                override.pop(name, None)
        for name, budget in zip(BUDGET_FIELDS, (tokens_per_day, tokens_per_month), strict=True):
            if budget is not None and budget >= 0:
                override[name] = budget
            elif budget is not None:
                override.pop(name, None)
        if share_weight is not None and share_weight > 0:
            if share_weight > MAX_SHARE_WEIGHT:
                raise InvalidArgument(f"rate_limit.share_weight must be at most {MAX_SHARE_WEIGHT:g}")
            override["share_weight"] = share_weight
        elif share_weight is not None:
            override.pop("share_weight", None)
        await self.backend.put_value(OVERRIDE_PREFIX + user_id, json.dumps(override).encode() if override else None)
        return await self.limits_for(user_id)

    def _key_limits(self, user: Limits) -> Limits:
        s = self.settings
        return Limits(s.rate_limit_api_key_requests_per_minute or user.requests_per_minute,
                      s.rate_limit_api_key_tokens_per_minute or user.tokens_per_minute)

    def _window(self) -> tuple[int, float]:
        now = self._clock()
        return int(now // WINDOW_SECONDS), (now % WINDOW_SECONDS) / WINDOW_SECONDS

    @staticmethod
    def _counter(kind: str, subject: str, window: int) -> str:
        return f"{PREFIX}ratelimit:{kind}:{subject}:{window}"

    async def check(self, user_id: str, api_key_id: str = "") -> Decision:
        """Admits (and counts) one request, or says how long to wait."""
        user_limits = (await self.limits_for(user_id)).limits
        subjects = [(f"user:{user_id}", user_limits, "your account")]
        if api_key_id:
            subjects.append((f"key:{api_key_id}", self._key_limits(user_limits), "this API key"))
        now = self._clock()
        window, fraction = self._window()
        requests = {self._counter("requests", s, window): 1 for s, _, _ in subjects}
        read = []
        for subject, _, _ in subjects:
            read += [self._counter("requests", subject, window - 1), self._counter("requests", subject, window),
                     self._counter("tokens", subject, window - 1), self._counter("tokens", subject, window)]
        periods = self.budgets.periods(now)
        read += [counter_key(user_id, p) for p in periods]
        values = await self.backend.add(requests, COUNTER_TTL_SECONDS, read)
        uses = await self.budgets.uses(user_id, user_limits.budgets, periods, values[4 * len(subjects):])
        decision = self._per_minute(subjects, values, fraction)
        over = refusing(uses)
        if over is not None:
            decision = Decision(False, over.period.seconds_left(now), over.refusal(), INSUFFICIENT_QUOTA)
        if not decision.allowed:
            # Refused requests do not count.
            await self.backend.add({key: -1 for key in requests}, COUNTER_TTL_SECONDS)
        return dataclasses.replace(decision, share_weight=user_limits.share_weight)

    @staticmethod
    def _per_minute(subjects: list[tuple[str, Limits, str]], values: list[int], fraction: float) -> Decision:
        wait, reason = 0.0, ""
        for i, (_, limits, who) in enumerate(subjects):
            prev_r, cur_r, prev_t, cur_t = values[4 * i:4 * i + 4]
            cur_r -= 1  # this request's own increment
            for limit, prev, cur, what in ((limits.requests_per_minute, prev_r, cur_r, "requests"),
                                           (limits.tokens_per_minute, prev_t, cur_t, "tokens")):
                if limit and estimate(prev, cur, fraction) + 1 > limit:
                    seconds = seconds_until_room(prev, cur, fraction, limit)
                    if seconds >= wait:
                        wait, reason = seconds, f"rate limit of {limit} {what} per minute reached for {who}"
        if not reason:
            return Decision(True)
        return Decision(False, max(1, math.ceil(wait)), reason, RATE_LIMIT_EXCEEDED)

    async def budget_uses(self, limits: UserLimits) -> list[BudgetUse]:
        """Each token budget of the user with what is used of it."""
        return await self.budgets.read(limits.user_id, limits.limits.budgets, self._clock())

    async def record(self, user_id: str, api_key_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        window, _ = self._window()
        increments = {self._counter("tokens", f"user:{user_id}", window): tokens}
        if api_key_id:
            increments[self._counter("tokens", f"key:{api_key_id}", window)] = tokens
        await self.backend.add(increments, COUNTER_TTL_SECONDS)
        await self.budgets.record(user_id, tokens, self._clock())
