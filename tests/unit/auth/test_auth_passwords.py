"""Password rules a user sees when registering, and argon2id hashing."""

from __future__ import annotations

import pytest

from services.auth.passwords import PasswordHasher, check_strength, check_username
from services.core.errors import InvalidArgument


@pytest.mark.parametrize(("password", "why"), [
    ("Sh0rt!", "too short"),
    ("alllowercaseletters", "too simple"),
    ("12345678901234", "too simple"),
    ("ALLUPPERCASEWORDS", "too simple"),
    ("alice-Secret-1", "username"),
    ("Password123", "common"),
])
def test_weak_passwords_are_refused_with_a_reason(password: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        check_strength(password, "Alice")


def test_reasonable_password_is_accepted() -> None:
    check_strength("blue tractor 42", "alice")
    check_strength("Tr0ub4dor&3x", "alice")


@pytest.mark.parametrize("name", ["ab", "a" * 33, "-alice", "al ice", "alice!", "élodie"])
def test_bad_usernames_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_username(name)


def test_hashes_are_argon2id_salted_and_verify() -> None:
    hasher = PasswordHasher(time_cost=1, memory_kib=1024, parallelism=1)
    first, second = hasher.hash("blue tractor 42"), hasher.hash("blue tractor 42")
    assert first.startswith("$argon2id$") and first != second
    assert hasher.verify(first, "blue tractor 42")
    assert not hasher.verify(first, "blue tractor 43")
    assert not hasher.verify(None, "blue tractor 42")  # unknown user: dummy hash, always False
    assert not hasher.verify("not a hash", "x")


def test_hash_parameters_upgrade_is_detected() -> None:
    weak = PasswordHasher(time_cost=1, memory_kib=1024, parallelism=1)
    stronger = PasswordHasher(time_cost=2, memory_kib=2048, parallelism=1)
    assert stronger.needs_rehash(weak.hash("blue tractor 42"))
    assert not weak.needs_rehash(weak.hash("blue tractor 42"))
