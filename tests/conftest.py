"""Suite-wide settings and fixtures: asyncio tests run on one event loop per test; a real
PostgreSQL server (started on first use) and `database`, a fresh empty database on each backend."""

import os

# The suite's process holds gRPC servers and channels while it starts services (fork, then exec).
# grpcio's fork support restarts its pollers in the forked child, which then aborts before exec
# (signal 6, "epoll_wait error: Bad file descriptor") about one start in three under load. A child
# that only execs needs none of it. Read when grpc is first imported: before anything below.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from services.core.config import DatabaseSettings
from services.core.database import Location
from tests.postgres_server import PostgresServer

# Tests never read a developer's own PARLEY_* settings.
for _name in [n for n in os.environ if n.startswith("PARLEY_")]:
    del os.environ[_name]

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def postgres_settings(url: str, **overrides: object) -> DatabaseSettings:
    """Settings for tests: short waits, so an outage shows within a second or two."""
    values: dict[str, object] = {"database_url": url, "database_pool_size": 4, "database_pool_timeout_seconds": 2.0,
                                 "database_connect_timeout_seconds": 2, "database_statement_timeout_seconds": 5.0,
                                 "database_startup_timeout_seconds": 10.0}
    values.update(overrides)
    return DatabaseSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """Where a store under test lives: an SQLite file, or a fresh database on the test PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "store.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return postgres_settings(server.create_database())
