"""LoginThrottle: failed logins per username and per client address first slow answers down, then
lock that username or address out for a while (RESOURCE_EXHAUSTED with retry_after, HTTP 429).

Counters live in this process; unknown usernames are counted exactly like known ones, so a lockout
says nothing about whether an account exists.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import prometheus_client

from services.auth.settings import AuthSettings
from services.core.errors import ResourceExhausted

MAX_TRACKED = 100_000  # keys kept before idle ones are dropped; bounds memory under a spray attack

LOGIN_FAILURES = prometheus_client.Counter("parley_auth_login_failures_total", "Sign-ins refused for a wrong username or password")
LOCKOUTS = prometheus_client.Counter("parley_auth_lockouts_total", "Lockouts started, by what was locked out",
                                     ["scope"])


@dataclass
class _Counter:
    failures: collections.deque[float] = field(default_factory=collections.deque)
    locked_until: float = 0.0


class LoginThrottle:
    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._s = settings
        self._clock = clock
        self._counters: dict[str, _Counter] = {}

    def _get(self, key: str, now: float) -> _Counter:
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= MAX_TRACKED:
                self._prune(now)
            counter = self._counters[key] = _Counter()
        window_start = now - self._s.login_failure_window_seconds
        while counter.failures and counter.failures[0] < window_start:
            counter.failures.popleft()
        return counter

    def _prune(self, now: float) -> None:
        window_start = now - self._s.login_failure_window_seconds
        self._counters = {k: c for k, c in self._counters.items()
                          if c.locked_until > now or (c.failures and c.failures[-1] >= window_start)}

    def _delay(self, failures: int, slowdown_after: int) -> float:
        if failures < slowdown_after:
            return 0.0
        return min(self._s.login_slowdown_max_seconds,
                   self._s.login_slowdown_seconds * 2 ** min(failures - slowdown_after, 16))

    def _address_slowdown_after(self) -> int:
        return max(self._s.login_slowdown_after, self._s.login_address_lockout_after // 2)

    def check(self, username_key: str, address: str) -> float:
        """Raises ResourceExhausted while either is locked out; else the seconds to wait before answering."""
        now = self._clock()
        user = self._get("u:" + username_key, now)
        addr = self._get("a:" + address, now)
        locked_until = max(user.locked_until, addr.locked_until)
        if locked_until > now:
            retry_after = locked_until - now
            raise ResourceExhausted(
                f"too many failed sign-in attempts; try again in {int(retry_after) + 1} s", retry_after=retry_after)
        return max(self._delay(len(user.failures), self._s.login_slowdown_after),
                   self._delay(len(addr.failures), self._address_slowdown_after()))

    def failed(self, username_key: str, address: str) -> None:
        now = self._clock()
        LOGIN_FAILURES.inc()
        for key, limit, scope in (("u:" + username_key, self._s.login_lockout_after, "username"),
                                  ("a:" + address, self._s.login_address_lockout_after, "address")):
            counter = self._get(key, now)
            counter.failures.append(now)
            if len(counter.failures) >= limit:
                if counter.locked_until <= now:
                    LOCKOUTS.labels(scope).inc()
                counter.locked_until = now + self._s.login_lockout_seconds

    def succeeded(self, username_key: str) -> None:
        self._counters.pop("u:" + username_key, None)
