"""The auth service's settings (PARLEY_* environment variables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.core.config import ConfigError, setting


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    """What only the auth service reads. The token issuer and audience live in
    core.identity.IdentitySettings, which every service reads."""

    allow_registration: bool = setting(False, help="let anyone create an account with Register")
    admin_password: str = setting("", secret=True,
                                  help="if set when no `admin` user exists, creates it with the admin role")
    signing_keys_dir: Path | None = setting(
        None, help="read-only directory of Ed25519 PEM keys (e.g. a Kubernetes Secret); the file whose name "
                   "sorts last signs. Unset: keys are made and rotated in the store")
    access_token_ttl_seconds: int = setting(900, min=30, max=86400)
    refresh_token_ttl_seconds: int = setting(30 * 86400, min=60, max=365 * 86400)
    refresh_reuse_grace_seconds: float = setting(
        5.0, min=0, max=60, help="a used refresh token presented again this soon after its use, while its successor "
                                 "is unused, gets that same successor (two tabs refreshing at once); later it is "
                                 "re-use and revokes the sign-in. 0: never")
    # argon2id: OWASP's baseline (19 MiB, 2 passes, 1 lane). Tests lower these.
    argon2_time_cost: int = setting(2, min=1, max=20)
    argon2_memory_kib: int = setting(19456, min=8, max=4 * 1024 * 1024)
    argon2_parallelism: int = setting(1, min=1, max=16)
    # Login throttling: per username and per client address, within a sliding window.
    login_failure_window_seconds: float = setting(900.0, min=1)
    login_slowdown_after: int = setting(3, min=1, help="failures before answers start to slow down")
    login_slowdown_seconds: float = setting(0.5, min=0, help="first delay; doubles with each failure")
    login_slowdown_max_seconds: float = setting(4.0, min=0)
    login_lockout_after: int = setting(10, min=1, help="failures per username before a lockout")
    login_address_lockout_after: int = setting(50, min=1, help="failures per client address before a lockout")
    login_lockout_seconds: float = setting(300.0, min=1)

    def validate(self) -> None:
        if self.login_lockout_after < self.login_slowdown_after:
            raise ConfigError("PARLEY_LOGIN_LOCKOUT_AFTER must be at least PARLEY_LOGIN_SLOWDOWN_AFTER")
