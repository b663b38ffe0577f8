"""Password hashing (argon2id) and the strength rules a new password must meet."""

from __future__ import annotations

import re
import secrets

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from services.core.errors import InvalidArgument

MIN_LENGTH = 10
MAX_LENGTH = 512  # argon2 copes with more; a cap stops megabyte "passwords" from costing CPU for nothing
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,31}$")

# A few of the most common passwords that pass the length and class rules.
COMMON = frozenset({
    "password123", "password1234", "password12345", "password1!", "qwerty12345", "qwerty123456",
    "1234567890a", "a1234567890", "iloveyou123", "welcome123", "welcome1234", "letmein123",
    "passw0rd123", "changeme123", "administrator1", "parleyparley1",
})


def check_username(username: str) -> str:
    """The username as given, if valid."""
    if not USERNAME.match(username):
        raise InvalidArgument(
            "username must be 3 to 32 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
    return username


def username_key(username: str) -> str:
    """What makes two usernames the same: usernames are case-insensitive."""
    return username.lower()


def check_strength(password: str, username: str) -> None:
    """Raises InvalidArgument saying why a password is too weak."""
    if len(password) < MIN_LENGTH:
        raise InvalidArgument(f"password is too short: use at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise InvalidArgument(f"password is too long: use at most {MAX_LENGTH} characters")
    classes = sum((
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    ))
    if classes < 2:
        raise InvalidArgument(
            "password is too simple: mix at least two of lowercase letters, uppercase letters, digits and symbols")
    if username and username.lower() in password.lower():
        raise InvalidArgument("password must not contain the username")
    if password.lower() in COMMON:
        raise InvalidArgument("password is one of the most common passwords: choose another")


class PasswordHasher:
    """argon2id with configurable cost; verifies against a dummy hash when the user does not exist so
    that an unknown username costs the same time as a wrong password."""

    def __init__(self, time_cost: int, memory_kib: int, parallelism: int) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=argon2.Type.ID)
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored: str | None, password: str) -> bool:
        """True if `password` matches `stored`; with `stored` None, burns the same time and says False."""
        try:
            self._hasher.verify(stored or self._dummy, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return stored is not None

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)
