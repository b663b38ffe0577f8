"""Auth unit fixtures: a store on each backend (an SQLite file, a fresh PostgreSQL database), cheap
argon2 parameters, fast throttling."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from tests.unit.auth.auth_testing import FAST

from services.auth.service import AuthService
from services.auth.store import AuthStore
from services.core.database import Location
from services.core.identity import IdentitySettings


@pytest.fixture
def store(database: Location) -> Iterator[AuthStore]:
    s = AuthStore(database)
    yield s
    s.close()


@pytest.fixture
async def service(store: AuthStore) -> AsyncIterator[AuthService]:
    svc = AuthService(store, FAST, IdentitySettings())
    await svc.start()
    yield svc
