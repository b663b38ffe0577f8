"""Opening a service's database: PostgreSQL when its location is a URL's settings, else a SQLite file
(services.core.database is the interface both implement; this module picks one)."""

from __future__ import annotations

from collections.abc import Sequence

from services.core.config import DatabaseSettings
from services.core.database import Database, Location, Migration
from services.core.postgres import PostgresDatabase
from services.core.sqlite import SqliteDatabase


def open_database(where: Location, migrations: Sequence[Migration], service: str) -> Database:
    """Opens (creating and migrating as needed) `service`'s database at `where`."""
    if isinstance(where, DatabaseSettings):
        return PostgresDatabase(where, f"parley_{service}", migrations)
    return SqliteDatabase(where, migrations)
