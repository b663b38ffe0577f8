"""LoginThrottle: failed logins per username and per client address first slow answers down, then
lock that username or address out for a while (RESOURCE_EXHAUSTED with retry_after, HTTP 429).

The counts live in the auth store (login_failures, login_lockouts), so every auth replica sees the
same ones: N replicas give an attacker the same number of attempts as one (plus at most one per
attempt racing on another replica). Times are wall-clock seconds, comparable across replicas.
Unknown usernames are counted exactly like known ones, so a lockout says nothing about whether an
account exists. Methods are synchronous (the store is); the service calls them in a thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import prometheus_client

from services.auth.settings import AuthSettings
from services.auth.store import AuthStore
from services.core.errors import ResourceExhausted

PRUNE_EVERY_SECONDS = 60.0  # how often failures of keys never seen again are dropped

LOGIN_FAILURES = prometheus_client.Counter("parley_auth_login_failures_total", "Sign-ins refused for a wrong username or password")
LOCKOUTS = prometheus_client.Counter("parley_auth_lockouts_total", "Lockouts started, by what was locked out",
                                     ["scope"])


def _key(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()


class LoginThrottle:
    def __init__(self, settings: AuthSettings, store: AuthStore, clock: Callable[[], float] = time.time) -> None:
        self._s = settings
        self._store = store
        self._clock = clock
        self._pruned = clock()

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
        user, addr = _key("u", username_key), _key("a", address)
        state = self._store.login_state((user, addr), now - self._s.login_failure_window_seconds)
        locked_until = max(state[user][1], state[addr][1])
        if locked_until > now:
            retry_after = locked_until - now
            raise ResourceExhausted(
                f"too many failed sign-in attempts; try again in {int(retry_after) + 1} s", retry_after=retry_after)
        return max(self._delay(state[user][0], self._s.login_slowdown_after),
                   self._delay(state[addr][0], self._address_slowdown_after()))

    def failed(self, username_key: str, address: str) -> None:
        now = self._clock()
        LOGIN_FAILURES.inc()
        since = now - self._s.login_failure_window_seconds
        user, addr = _key("u", username_key), _key("a", address)
        started = self._store.record_login_failure(
            {user: self._s.login_lockout_after, addr: self._s.login_address_lockout_after}, now, since,
            now + self._s.login_lockout_seconds)
        for key in started:
            LOCKOUTS.labels("username" if key == user else "address").inc()
        if now - self._pruned >= PRUNE_EVERY_SECONDS:
            self._pruned = now
            self._store.prune_login_failures(since, now)

    def succeeded(self, username_key: str) -> None:
        self._store.clear_login_failures(_key("u", username_key))
