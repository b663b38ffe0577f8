"""PostgreSQL behind auth and session, on a real server: migrations from several processes at
once, an outage as 503 with Retry-After and recovery without a restart, and a URL whose password
never reaches a log line or an error message."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth import app as auth_app
from services.auth.store import MIGRATIONS as AUTH_MIGRATIONS
from services.core import config
from services.core.config import CommonSettings, ConfigError, DatabaseSettings
from services.core.server import start_server
from services.session.store import MIGRATIONS as SESSION_MIGRATIONS
from tests.conftest import postgres_settings
from tests.postgres_server import PostgresServer
from tests.unit.auth.auth_testing import FAST, PASSWORD

MIGRATE = """
import sys
from services.auth.store import AuthStore
from services.core.config import DatabaseSettings
from services.session.store import SqlSessionStore
settings = DatabaseSettings(database_url=sys.argv[1])
sys.stdin.readline()  # start together
AuthStore(settings).close()
SqlSessionStore(settings).close()
"""


def test_a_bad_url_stops_startup_without_echoing_it() -> None:
    for url in ("mysql://root:hunter2secret@db/x", "postgresql://root:hunter2secret@db:notaport/x"):
        with pytest.raises(ConfigError) as caught:
            config.load(DatabaseSettings, {"PARLEY_DATABASE_URL": url})
        assert "hunter2secret" not in str(caught.value) and "PARLEY_DATABASE_URL" in str(caught.value)
    described = config.describe(DatabaseSettings(database_url="postgresql://u:hunter2secret@db/x"))
    assert described["database_url"] == "***"


def test_migrations_from_several_processes_at_once_run_once(postgres: PostgresServer) -> None:
    url = postgres.create_database()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    starters = [subprocess.Popen([sys.executable, "-c", MIGRATE, url], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=env) for _ in range(3)]
    time.sleep(1.0)  # all three imported and waiting
    for p in starters:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    for p in starters:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()[-2000:]
    with psycopg.connect(url) as connection:
        for schema, migrations in (("parley_auth", AUTH_MIGRATIONS), ("parley_session", SESSION_MIGRATIONS)):
            versions = [r[0] for r in connection.execute(f"SELECT version FROM {schema}.schema_migrations ORDER BY 1")]
            assert versions == list(range(1, len(migrations) + 1))


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own: it is stopped and started again."""
    server = PostgresServer()
    server.start()
    yield server
    server.close()


async def test_an_outage_is_503_with_retry_after_then_the_service_resumes(
        own_postgres: PostgresServer, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    url = own_postgres.create_database()
    spec = await auth_app.build(CommonSettings(data_dir=tmp_path), FAST, database_settings=postgres_settings(url))
    server = await start_server(spec, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await stub.Register(auth_pb2.RegisterRequest(username="alice", password=PASSWORD))
            own_postgres.stop()
            for _ in range(2):  # the idle pooled connection is found broken, then no new one opens
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD), timeout=30)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
                assert "database" in (caught.value.details() or "")
                assert dict(caught.value.trailing_metadata() or ())["retry-after"] == "2"
                assert time.monotonic() - started < 5  # the pool's timeout, not a hang
            own_postgres.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    answer = await stub.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD), timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            assert answer.user.username == "alice"
    finally:
        await server.stop(0)
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "database unreachable" in logged
    assert own_postgres.password not in logged


def test_startup_waits_for_the_database_then_says_it_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    from services.auth.store import AuthStore

    settings = postgres_settings("postgresql://parley:hunter2secret@127.0.0.1:9/none",
                                 database_startup_timeout_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="PostgreSQL is unreachable") as caught:
        AuthStore(settings)
    assert time.monotonic() - started < 10
    assert "hunter2secret" not in str(caught.value)
    assert "hunter2secret" not in "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
