"""LoginThrottle: failed logins per username and per client address first slow answers down, then
lock that username or address out for a while (RESOURCE_EXHAUSTED with retry_after, HTTP 429).

Every attempt is counted in the auth store (login_failures, login_lockouts) before its password is
checked, as a failure until it succeeds: concurrent attempts, on one replica or on several, are
counted one after the other, so a parallel guesser gets no more attempts than a sequential one.
Times are wall-clock seconds, comparable across replicas. Unknown usernames are counted exactly
like known ones, so a lockout says nothing about whether an account exists. Methods are
synchronous (the store is); the service calls them in a thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import prometheus_client

from services.auth.settings import AuthSettings
from services.auth.store import AuthStore, LoginAttempt
from services.core.errors import ResourceExhausted

PRUNE_EVERY_SECONDS = 60.0  # how often failures of keys never seen again are dropped

LOGIN_FAILURES = prometheus_client.Counter("parley_auth_login_failures_total", "Sign-ins refused for a wrong username or password")
LOCKOUTS = prometheus_client.Counter("parley_auth_lockouts_total", "Lockouts started, by what was locked out",
                                     ["scope"])


def _key(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()


@dataclass(frozen=True)
class Attempt:
    """A sign-in attempt admitted by the throttle: wait `delay` seconds, check the password, then
    report failed() or succeeded()."""

    delay: float
    reserved: LoginAttempt
    user_key: str


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

    def attempt(self, username_key: str, address: str) -> Attempt:
        """Counts an attempt (as a failure until succeeded()). Raises ResourceExhausted while either
        the username or the address is locked out."""
        now = self._clock()
        user, addr = _key("u", username_key), _key("a", address)
        since = now - self._s.login_failure_window_seconds
        reserved = self._store.reserve_login_attempt(
            {user: self._s.login_lockout_after, addr: self._s.login_address_lockout_after}, now, since,
            now + self._s.login_lockout_seconds)
        if not isinstance(reserved, LoginAttempt):
            retry_after = reserved - now
            raise ResourceExhausted(
                f"too many failed sign-in attempts; try again in {int(retry_after) + 1} s", retry_after=retry_after)
        if now - self._pruned >= PRUNE_EVERY_SECONDS:
            self._pruned = now
            self._store.prune_login_failures(since, now)
        delay = max(self._delay(reserved.failures[user], self._s.login_slowdown_after),
                    self._delay(reserved.failures[addr], self._address_slowdown_after()))
        return Attempt(delay, reserved, user)

    def failed(self, attempt: Attempt) -> None:
        """The attempt stays counted, and now slows the next ones down."""
        LOGIN_FAILURES.inc()
        self._store.login_failed(attempt.reserved)
        for key in attempt.reserved.started:
            LOCKOUTS.labels("username" if key == attempt.user_key else "address").inc()

    def succeeded(self, attempt: Attempt) -> None:
        """A right password: the username's failures are cleared and this attempt is not counted."""
        self._store.login_succeeded(attempt.reserved, attempt.user_key)
