"""AuthStore: users, refresh tokens, API keys, signing keys and failed sign-ins, in one SQLite file
or in PostgreSQL (services.core.database; PARLEY_DATABASE_URL).

The database's handling (WAL and mode 0600 for the file — it holds private signing keys and password
hashes —, the pool, migrations, outages) is services.core's; the async service calls these
synchronous methods through asyncio.to_thread.

What must hold across replicas holds in the database: a refresh token is used once (a conditional
UPDATE; of concurrent refreshes exactly one changes the row), a revoked API key is refused by every
auth replica at once, and sign-in attempts are counted in one place (login_failures, login_lockouts),
before the password is checked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.core.database import Conflict, Location, Migration
from services.core.database_open import open_database
from services.core.errors import AlreadyExists

MIGRATIONS: tuple[Migration, ...] = (
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        username_key TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        roles TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE refresh_tokens (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        family_id TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        revoked_at REAL
    );
    CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        secret_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        expires_at REAL,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE INDEX api_keys_user ON api_keys(user_id, created_at, id);
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        private_pem TEXT NOT NULL,
        public_x TEXT NOT NULL,
        created_at REAL NOT NULL,
        retired_at REAL,
        verify_until REAL
    );
    """,
    # Failed sign-ins, shared by every replica (services/auth/throttle.py). Keys are hashes of
    # "u:<username>" or "a:<address>": a password typed into the username field is never stored.
    """
    CREATE TABLE login_failures (
        key TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX login_failures_key ON login_failures(key, at);
    CREATE INDEX login_failures_at ON login_failures(at);
    CREATE TABLE login_lockouts (
        key TEXT PRIMARY KEY,
        locked_until REAL NOT NULL
    );
    """,
    # A used refresh token keeps the random salt its successor was derived with (HMAC of the old
    # token, services/auth/service.py), so a concurrent refresh with the same token within the grace
    # window gets the same successor; neither token is stored, only their hashes. A sign-in attempt
    # is counted before its password is checked: its row names the attempt while it is in flight,
    # so that a success removes its own row only (a failure clears the name).
    """
    ALTER TABLE refresh_tokens ADD COLUMN successor_salt TEXT;
    ALTER TABLE login_failures ADD COLUMN attempt TEXT;
    CREATE INDEX login_failures_attempt ON login_failures(attempt)
    """,
    # An API key's weight within its user's fair share (services/inference/engines/fair.py); keys
    # made before it have weight 1.
    """
    ALTER TABLE api_keys ADD COLUMN share_weight REAL NOT NULL DEFAULT 1
    """,
)


@dataclass(frozen=True)
class UserRecord:
    id: str
    username: str
    password_hash: str
    roles: tuple[str, ...]
    created_at: float


@dataclass(frozen=True)
class RefreshRecord:
    id: str
    family_id: str
    user_id: str
    expires_at: float
    used_at: float | None
    revoked_at: float | None
    successor_salt: str | None = None


@dataclass(frozen=True)
class LoginAttempt:
    """A sign-in attempt counted in advance (reserve_login_attempt): per key, the failures before it
    (attempts still in flight count towards a lockout but not here, so concurrent sign-ins from one
    address do not slow each other down), and the keys whose lockout it started (being the last
    attempt allowed)."""

    id: str
    keys: tuple[str, ...]
    failures: Mapping[str, int]
    started: tuple[str, ...]


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    user_id: str
    name: str
    prefix: str
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None
    share_weight: float = 1.0


@dataclass(frozen=True)
class SigningKeyRecord:
    kid: str
    private_pem: str
    public_x: str
    created_at: float
    retired_at: float | None
    verify_until: float | None


def _user(row: Mapping[str, Any]) -> UserRecord:
    return UserRecord(row["id"], row["username"], row["password_hash"],
                      tuple(r for r in row["roles"].split(",") if r), row["created_at"])


def _api_key(row: Mapping[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(row["id"], row["user_id"], row["name"], row["prefix"], row["created_at"],
                        row["expires_at"], row["last_used_at"], row["revoked_at"], float(row["share_weight"]))


def _signing_key(row: Mapping[str, Any]) -> SigningKeyRecord:
    return SigningKeyRecord(row["kid"], row["private_pem"], row["public_x"], row["created_at"],
                            row["retired_at"], row["verify_until"])


class AuthStore:
    def __init__(self, where: Location) -> None:
        """`where`: an SQLite file's path, or DatabaseSettings naming a PostgreSQL database."""
        self.db = open_database(where, MIGRATIONS, "auth")
        self._tx = self.db.transaction
        self._read = self.db.read

    def close(self) -> None:
        self.db.close()

    def schema_version(self) -> int:
        return self.db.schema_version()

    # Users

    def create_user(self, username: str, username_key: str, password_hash: str, roles: tuple[str, ...]) -> UserRecord:
        user = UserRecord(uuid.uuid4().hex, username, password_hash, roles, time.time())
        try:
            with self._tx() as db:
                db.execute("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)",
                           (user.id, username, username_key, password_hash, ",".join(roles), user.created_at))
        except Conflict:
            raise AlreadyExists("that username is taken") from None
        return user

    def user_by_key(self, username_key: str) -> UserRecord | None:
        rows = self._read("SELECT * FROM users WHERE username_key = ?", (username_key,))
        return _user(rows[0]) if rows else None

    def user_by_id(self, user_id: str) -> UserRecord | None:
        rows = self._read("SELECT * FROM users WHERE id = ?", (user_id,))
        return _user(rows[0]) if rows else None

    def set_password_hash(self, user_id: str, password_hash: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))

    def set_roles(self, user_id: str, roles: tuple[str, ...]) -> None:
        with self._tx() as db:
            db.execute("UPDATE users SET roles = ? WHERE id = ?", (",".join(roles), user_id))

    # Refresh tokens

    def add_refresh_token(self, token_hash: str, family_id: str, user_id: str, expires_at: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO refresh_tokens (id, token_hash, family_id, user_id, created_at, expires_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (uuid.uuid4().hex, token_hash, family_id, user_id, time.time(), expires_at))

    def refresh_token(self, token_hash: str) -> RefreshRecord | None:
        rows = self._read("SELECT * FROM refresh_tokens WHERE token_hash = ?", (token_hash,))
        if not rows:
            return None
        r = rows[0]
        return RefreshRecord(r["id"], r["family_id"], r["user_id"], r["expires_at"], r["used_at"], r["revoked_at"],
                             r["successor_salt"])

    def rotate_refresh_token(self, old_id: str, new_hash: str, family_id: str, user_id: str,
                             expires_at: float, successor_salt: str | None = None) -> bool:
        """Marks the old token used (keeping the salt its successor was derived with) and stores its
        successor, atomically. False if the old one was used or revoked meanwhile (a concurrent
        refresh won: the caller looks at the old token again)."""
        now = time.time()
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE refresh_tokens SET used_at = ?, successor_salt = ?"
                " WHERE id = ? AND used_at IS NULL AND revoked_at IS NULL",
                (now, successor_salt, old_id))
            if cursor.rowcount != 1:
                return False
            db.execute("INSERT INTO refresh_tokens (id, token_hash, family_id, user_id, created_at, expires_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (uuid.uuid4().hex, new_hash, family_id, user_id, now, expires_at))
        return True

    def revoke_family(self, family_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
                       (time.time(), family_id))

    def revoke_user_refresh_tokens(self, user_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                       (time.time(), user_id))

    # API keys

    def add_api_key(self, user_id: str, name: str, prefix: str, secret_hash: str,
                    expires_at: float | None, share_weight: float = 1.0) -> ApiKeyRecord:
        key = ApiKeyRecord(uuid.uuid4().hex, user_id, name, prefix, time.time(), expires_at, None, None, share_weight)
        with self._tx() as db:
            db.execute("INSERT INTO api_keys (id, user_id, name, prefix, secret_hash, created_at, expires_at,"
                       " share_weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (key.id, user_id, name, prefix, secret_hash, key.created_at, expires_at, share_weight))
        return key

    def update_api_key(self, user_id: str, key_id: str, name: str | None,
                       share_weight: float | None) -> ApiKeyRecord | None:
        """Sets what is not None of a live key of `user_id`; None when it has no such key."""
        with self._tx() as db:
            rows = db.execute(
                "UPDATE api_keys SET name = COALESCE(?, name), share_weight = COALESCE(?, share_weight)"
                " WHERE id = ? AND user_id = ? AND revoked_at IS NULL RETURNING *",
                (name, share_weight, key_id, user_id)).fetchall()
        return _api_key(rows[0]) if rows else None

    def count_api_keys(self, user_id: str) -> int:
        return int(self._read("SELECT COUNT(*) AS n FROM api_keys WHERE user_id = ? AND revoked_at IS NULL",
                              (user_id,))[0]["n"])

    def list_api_keys(self, user_id: str, after: tuple[float, str] | None, limit: int) -> list[ApiKeyRecord]:
        created, key_id = after or (-1.0, "")
        rows = self._read(
            "SELECT * FROM api_keys WHERE user_id = ? AND revoked_at IS NULL AND (created_at, id) > (?, ?)"
            " ORDER BY created_at, id LIMIT ?", (user_id, created, key_id, limit))
        return [_api_key(r) for r in rows]

    def api_key_by_hash(self, secret_hash: str) -> ApiKeyRecord | None:
        rows = self._read("SELECT * FROM api_keys WHERE secret_hash = ?", (secret_hash,))
        return _api_key(rows[0]) if rows else None

    def touch_api_key(self, key_id: str, when: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (when, key_id))

    def revoke_api_key(self, user_id: str, key_id: str) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND user_id = ? AND revoked_at IS NULL",
                (time.time(), key_id, user_id))
            return cursor.rowcount == 1

    # Signing keys

    def signing_keys(self) -> list[SigningKeyRecord]:
        return [_signing_key(r) for r in self._read("SELECT * FROM signing_keys ORDER BY created_at")]

    def add_signing_key(self, kid: str, private_pem: str, public_x: str, retire_after: float) -> None:
        """Stores a new current key; the previous current key retires and verifies until
        now + `retire_after` (the longest lifetime of a token it signed). Expired keys are dropped."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE signing_keys SET retired_at = ?, verify_until = ? WHERE retired_at IS NULL",
                       (now, now + retire_after))
            db.execute("DELETE FROM signing_keys WHERE verify_until IS NOT NULL AND verify_until < ?", (now,))
            db.execute("INSERT INTO signing_keys VALUES (?, ?, ?, ?, NULL, NULL)", (kid, private_pem, public_x, now))

    # Failed sign-ins (services/auth/throttle.py keeps the rules; this keeps the counts)

    def reserve_login_attempt(self, limits: Mapping[str, int], now: float, since: float,
                              lock_until: float) -> LoginAttempt | float:
        """Counts an attempt for each key before its password is checked, as a failure until
        login_succeeded says otherwise. Returns the time the lockout ends if a key is locked out
        (nothing counted), else the attempt: an attempt that brings a key to its limit of failures
        since `since` locks that key until `lock_until`, so later attempts are refused while it is
        checked. Each key's lockout row is locked first (in sorted order), so concurrent attempts on
        any number of replicas count one after the other: a parallel guesser gets no more attempts
        than a sequential one."""
        keys = tuple(sorted(limits))
        attempt_id = uuid.uuid4().hex
        failures: dict[str, int] = {}
        started = []
        with self._tx() as db:
            locked_until = 0.0
            for key in keys:
                # An upsert that changes nothing but takes the row's lock (PostgreSQL) for this transaction.
                row = db.execute("INSERT INTO login_lockouts VALUES (?, 0) ON CONFLICT (key) DO UPDATE "
                                 "SET locked_until = login_lockouts.locked_until RETURNING locked_until",
                                 (key,)).fetchall()
                locked_until = max(locked_until, float(row[0]["locked_until"]))
            if locked_until > now:
                return locked_until
            for key in keys:
                db.execute("DELETE FROM login_failures WHERE key = ? AND at < ?", (key, since))
                counts = db.execute("SELECT COUNT(*) AS n, COUNT(attempt) AS pending FROM login_failures"
                                    " WHERE key = ?", (key,)).fetchall()[0]
                failures[key] = int(counts["n"]) - int(counts["pending"])
                db.execute("INSERT INTO login_failures (key, at, attempt) VALUES (?, ?, ?)", (key, now, attempt_id))
                if int(counts["n"]) + 1 >= limits[key]:
                    started.append(key)
                    db.execute("UPDATE login_lockouts SET locked_until = ? WHERE key = ?", (lock_until, key))
        return LoginAttempt(attempt_id, keys, failures, tuple(started))

    def login_failed(self, attempt: LoginAttempt) -> None:
        """The attempt was a failure: no longer in flight, its rows now slow the next attempts down."""
        with self._tx() as db:
            db.execute("UPDATE login_failures SET attempt = NULL WHERE attempt = ?", (attempt.id,))

    def login_succeeded(self, attempt: LoginAttempt, cleared: str) -> None:
        """The attempt was not a failure: its rows go, the failures of key `cleared` (the username)
        with them, and the lockouts it started end."""
        with self._tx() as db:
            db.execute("DELETE FROM login_failures WHERE key = ?", (cleared,))
            for key in attempt.keys:
                db.execute("DELETE FROM login_failures WHERE key = ? AND attempt = ?", (key, attempt.id))
            for key in attempt.started:
                db.execute("UPDATE login_lockouts SET locked_until = 0 WHERE key = ?", (key,))

    def prune_login_failures(self, since: float, now: float) -> None:
        """Drops failures older than the window and lockouts that have ended (keys never seen again)."""
        with self._tx() as db:
            db.execute("DELETE FROM login_failures WHERE at < ?", (since,))
            db.execute("DELETE FROM login_lockouts WHERE locked_until < ?", (now,))
