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
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.cache.backends import PREFIX, Backend
from services.cache.settings import CacheSettings
from services.core.errors import InvalidArgument

WINDOW_SECONDS = 60.0
COUNTER_TTL_SECONDS = 2 * WINDOW_SECONDS + 5
OVERRIDE_PREFIX = PREFIX + "ratelimit:override:"


@dataclass(frozen=True)
class Limits:
    """Per minute; 0 means unlimited."""

    requests_per_minute: int
    tokens_per_minute: int


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
    def __init__(self, backend: Backend, settings: CacheSettings, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.settings = settings
        self._clock = clock

    @property
    def defaults(self) -> Limits:
        return Limits(self.settings.rate_limit_requests_per_minute, self.settings.rate_limit_tokens_per_minute)

    async def _override(self, user_id: str) -> dict[str, int | None]:
        raw = await self.backend.get_value(OVERRIDE_PREFIX + user_id)
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            return {}
        return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}

    async def limits_for(self, user_id: str) -> UserLimits:
        override = await self._override(user_id)
        base = self.defaults
        limits = Limits(
            override.get("requests_per_minute", base.requests_per_minute),  # type: ignore[arg-type]
            override.get("tokens_per_minute", base.tokens_per_minute),  # type: ignore[arg-type]
        )
        return UserLimits(user_id, limits, bool(override))

    async def update(self, user_id: str, requests_per_minute: int, tokens_per_minute: int) -> UserLimits:
        """A per-user override. Per field: > 0 sets it, 0 keeps what is in force (a PATCH that leaves
        a field out), < 0 returns it to the configured default. With no field left overridden the
        override is removed."""
        if not user_id:
            raise InvalidArgument("rate_limit.user_id is required")
        override = await self._override(user_id)
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value > 0:
                override[name] = value
            elif value < 0:
                override.pop(name, None)
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
        window, fraction = self._window()
        requests = {self._counter("requests", s, window): 1 for s, _, _ in subjects}
        read = []
        for subject, _, _ in subjects:
            read += [self._counter("requests", subject, window - 1), self._counter("requests", subject, window),
                     self._counter("tokens", subject, window - 1), self._counter("tokens", subject, window)]
        values = await self.backend.add(requests, COUNTER_TTL_SECONDS, read)
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
        # Refused requests do not count.
        await self.backend.add({key: -1 for key in requests}, COUNTER_TTL_SECONDS)
        return Decision(False, max(1, math.ceil(wait)), reason)

    async def record(self, user_id: str, api_key_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        window, _ = self._window()
        increments = {self._counter("tokens", f"user:{user_id}", window): tokens}
        if api_key_id:
            increments[self._counter("tokens", f"key:{api_key_id}", window)] = tokens
        await self.backend.add(increments, COUNTER_TTL_SECONDS)
