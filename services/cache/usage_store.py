"""The usage ledger's table: one row per UTC day, user, API key and model, with its sums.

The cache service owns it, in a database of its own beside auth's and session's
(services/core/database.py): `<data dir>/usage.db` on SQLite, or the `parley_usage` schema when
PARLEY_DATABASE_URL names a PostgreSQL server that every replica shares. Rows only grow: each flush
of the in-memory aggregate (services.cache.ledger) adds to them with one upsert per row, all in one
transaction, so a replica killed mid-flush leaves the table as it was before that flush and
replicas flushing at once add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import date

from services.core.database import Location, Migration, Row
from services.core.database_open import open_database

MIGRATIONS: tuple[Migration, ...] = (
    """
    CREATE TABLE usage_daily (
        day TEXT NOT NULL,
        user_id TEXT NOT NULL,
        api_key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        requests BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        input_cached_tokens BIGINT NOT NULL,
        cached_requests BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        PRIMARY KEY (day, user_id, api_key_id, model)
    );
    CREATE INDEX usage_daily_by_user ON usage_daily (user_id, day)
    """,
)

# What a usage report may group by, each a column of usage_daily (never a caller's string in SQL).
GROUPS = ("model", "api_key_id", "user_id")


@dataclass
class Counts:
    """What one row sums. Answers replayed from the response cache are apart from the rest."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    input_cached_tokens: int = 0
    cached_requests: int = 0
    cached_tokens: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def tokens(self) -> int:
        """What the budgets count: generated prompt + completion tokens."""
        return self.input_tokens + self.output_tokens


COLUMNS = tuple(f.name for f in fields(Counts))


@dataclass(frozen=True)
class Subject:
    """A row's key."""

    day: date
    user_id: str
    api_key_id: str
    model: str


@dataclass(frozen=True)
class Line:
    """A report line: a day, the groups asked for (None where not grouped) and the sums."""

    day: date
    groups: dict[str, str | None]
    counts: Counts


UPSERT = (f"INSERT INTO usage_daily (day, user_id, api_key_id, model, {', '.join(COLUMNS)}) "
          f"VALUES (?, ?, ?, ?, {', '.join('?' for _ in COLUMNS)}) "
          "ON CONFLICT (day, user_id, api_key_id, model) DO UPDATE SET "
          + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in COLUMNS))


class UsageStore:
    def __init__(self, where: Location) -> None:
        self.db = open_database(where, MIGRATIONS, "usage")

    def close(self) -> None:
        self.db.close()

    def add(self, rows: Iterable[tuple[Subject, Counts]]) -> None:
        """Adds every row's counts in one transaction."""
        with self.db.transaction() as tx:
            for subject, counts in rows:
                tx.execute(UPSERT, (subject.day.isoformat(), subject.user_id, subject.api_key_id, subject.model,
                                    *counts.values()))

    def tokens(self, user_id: str, first: date, stop: date) -> int:
        """A user's generated tokens on the days [first, stop)."""
        rows = self.db.read("SELECT COALESCE(SUM(input_tokens + output_tokens), 0) AS tokens FROM usage_daily "
                            "WHERE user_id = ? AND day >= ? AND day < ?",
                            (user_id, first.isoformat(), stop.isoformat()))
        return int(rows[0]["tokens"])

    def report(self, first: date, stop: date, group_by: Sequence[str], user_id: str | None) -> list[Line]:
        """Sums per day and per the `group_by` columns on the days [first, stop); one user's or
        (user_id None) everyone's."""
        groups = [g for g in GROUPS if g in group_by]
        selected = "".join(f", {g}" for g in groups)
        where = "day >= ? AND day < ?" + (" AND user_id = ?" if user_id is not None else "")
        args = [first.isoformat(), stop.isoformat()] + ([user_id] if user_id is not None else [])
        sums = ", ".join(f"SUM({c}) AS {c}" for c in COLUMNS)
        rows = self.db.read(f"SELECT day{selected}, {sums} FROM usage_daily WHERE {where} "
                            f"GROUP BY day{selected} ORDER BY day{selected}", args)
        return [self._line(row, groups) for row in rows]

    @staticmethod
    def _line(row: Row, groups: Sequence[str]) -> Line:
        return Line(date.fromisoformat(row["day"]), {g: row[g] for g in groups},
                    Counts(**{c: int(row[c]) for c in COLUMNS}))
