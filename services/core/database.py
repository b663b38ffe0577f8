"""The databases auth, session and the cache's usage ledger keep their data in: one interface, two
engines.

- SQLite (services/core/sqlite.py), the embedded default: one file per service in the data dir, one
  process writing it, so one replica.
- PostgreSQL (services/core/postgres.py) when PARLEY_DATABASE_URL is set: every replica of a
  service shares it; each service keeps its tables in a schema of its own (parley_auth,
  parley_session, parley_usage), so one database can hold them all.

Stores write their SQL once, with `?` placeholders and SQL that both engines accept; rows are read
by column name. A service's schema is one list of migrations — versioned, in order, each applied
once in the transaction that records it in `schema_migrations` — and serves both engines: a
migration is one script for both (SQLite's column types are mapped to PostgreSQL's, see
postgres.ddl) or, where they must differ, a {"sqlite": …, "postgresql": …} pair. Several replicas
starting at once migrate once: on PostgreSQL under an advisory lock, on SQLite in one IMMEDIATE
transaction.

Errors: a write that breaks a unique or foreign key constraint raises Conflict (the store turns it
into its domain error); an unreachable database raises Unavailable (503 with Retry-After) — never a
hang past the pool and statement timeouts, never INTERNAL — and the next call after it is back
succeeds (the pool checks each connection before lending it).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from services.core.config import DatabaseSettings

# One script for both engines, or one per engine: {"sqlite": ..., "postgresql": ...}.
Migration = str | Mapping[str, str]
Row = Mapping[str, Any]

MIGRATIONS_TABLE = "schema_migrations"


class Conflict(Exception):
    """A write broke a unique or foreign key constraint."""


class Cursor(Protocol):
    rowcount: int

    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...


class Database(abc.ABC):
    """What a store needs of its database. Methods are synchronous; async code calls the stores
    through asyncio.to_thread."""

    dialect: str

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """One write transaction: committed when the block ends, rolled back when it raises."""

    @abc.abstractmethod
    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def schema_version(self) -> int:
        return int(self.read(f"SELECT COALESCE(MAX(version), 0) AS version FROM {MIGRATIONS_TABLE}")[0]["version"])


def script_for(migration: Migration, dialect: str) -> str:
    return migration if isinstance(migration, str) else migration[dialect]


def statements(script: str) -> Iterator[str]:
    """The statements of a migration script (no `;` inside string literals in migrations)."""
    return (s.strip() for s in script.split(";") if s.strip())


Location = Path | DatabaseSettings


def location(data_dir: Path, settings: DatabaseSettings, service: str) -> Location:
    """Where `service` keeps its data: PostgreSQL when a URL is set, else `<data dir>/<service>.db`."""
    return settings if settings.uses_postgres else data_dir / f"{service}.db"
