"""The SQLite store: schema migrations, file permissions, WAL, case-insensitive usernames."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from services.auth.store import MIGRATIONS, AuthStore
from services.core.database_open import open_database
from services.core.errors import AlreadyExists


def test_database_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "sub" / "auth.db")
    try:
        mode = stat.S_IMODE((tmp_path / "sub" / "auth.db").stat().st_mode)
        assert mode == 0o600, oct(mode)
        with sqlite3.connect(tmp_path / "sub" / "auth.db") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_migrations_run_once_and_are_recorded(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth.db")
    store.create_user("alice", "alice", "h", ("user",))
    store.close()
    again = AuthStore(tmp_path / "auth.db")  # reopening must not re-run or fail
    try:
        assert again.schema_version() == len(MIGRATIONS)
        assert again.user_by_key("alice") is not None
    finally:
        again.close()


def test_api_keys_of_a_database_made_before_key_weights_get_weight_1(tmp_path: Path) -> None:
    older = open_database(tmp_path / "auth.db", MIGRATIONS[:3], "auth")  # before share_weight existed
    with older.transaction() as db:
        db.execute("INSERT INTO users VALUES ('u1', 'alice', 'alice', 'h', 'user', 0)")
        db.execute("INSERT INTO api_keys VALUES ('k1', 'u1', 'old', 'pk-old', 'hash', 0, NULL, NULL, NULL)")
    older.close()
    store = AuthStore(tmp_path / "auth.db")
    try:
        assert store.schema_version() == len(MIGRATIONS)
        key = store.api_key_by_hash("hash")
        assert key is not None and key.share_weight == 1.0
        updated = store.update_api_key("u1", "k1", None, 2.5)
        assert updated is not None and (updated.name, updated.share_weight) == ("old", 2.5)
    finally:
        store.close()


def test_usernames_are_unique_regardless_of_case(store: AuthStore) -> None:
    store.create_user("Alice", "alice", "h", ("user",))
    with pytest.raises(AlreadyExists):
        store.create_user("ALICE", "alice", "h", ("user",))
    user = store.user_by_key("alice")
    assert user is not None and user.username == "Alice"


def test_rotation_is_single_use(store: AuthStore) -> None:
    user = store.create_user("bob", "bob", "h", ("user",))
    store.add_refresh_token("hash-1", "fam", user.id, 1e12)
    record = store.refresh_token("hash-1")
    assert record is not None
    assert store.rotate_refresh_token(record.id, "hash-2", "fam", user.id, 1e12)
    assert not store.rotate_refresh_token(record.id, "hash-3", "fam", user.id, 1e12)
    store.revoke_family("fam")
    second = store.refresh_token("hash-2")
    assert second is not None and second.revoked_at is not None
