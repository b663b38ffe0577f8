"""Shared settings for the auth unit tests (a module with a unique name, importable from tests)."""

from __future__ import annotations

import dataclasses

from services.auth.settings import AuthSettings

# Cheap argon2 so that a test costs milliseconds (the defaults are checked in test_auth_service.py).
FAST = AuthSettings(argon2_time_cost=1, argon2_memory_kib=1024, argon2_parallelism=1, allow_registration=True,
                    login_slowdown_after=3, login_slowdown_seconds=0.01, login_slowdown_max_seconds=0.05,
                    login_lockout_after=5, login_address_lockout_after=12, login_lockout_seconds=60)
PASSWORD = "correct-Horse-7"


def settings(**changes: object) -> AuthSettings:
    return dataclasses.replace(FAST, **changes)
