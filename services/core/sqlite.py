"""SQLite files the services own (auth.db, session.db): WAL mode, durable commits, versioned schema.

Methods are synchronous and serialized by a lock on one connection; async code calls them through
asyncio.to_thread. The schema is versioned by a `schema_migrations` table: each entry of
`migrations` runs once, in order, in the same transaction that records it, so a crash mid-migration
leaves the previous version intact. Files are created mode 0600: they hold user data.

synchronous=FULL: a commit is on disk before the caller is told it succeeded, so nothing
acknowledged is lost even on power loss (WAL's default NORMAL survives a process crash only).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.core.database import MIGRATIONS_TABLE, Conflict, Database, Migration, script_for, statements


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path, migrations: Sequence[Migration]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._migrate(migrations)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE so that concurrent processes (a CLI) queue up."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise Conflict(str(exc)) from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        with self.transaction() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version INTEGER PRIMARY KEY, applied_at REAL)")
            done = {row["version"] for row in db.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")}
            for version, migration in enumerate(migrations, start=1):
                if version in done:
                    continue
                for statement in statements(script_for(migration, self.dialect)):
                    db.execute(statement)
                db.execute(f"INSERT INTO {MIGRATIONS_TABLE} VALUES (?, ?)", (version, time.time()))
