"""Auth unit fixtures: a store in a temporary dir, cheap argon2 parameters, fast throttling."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.unit.auth.auth_testing import FAST

from services.auth.service import AuthService
from services.auth.store import AuthStore
from services.core.identity import IdentitySettings


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuthStore]:
    s = AuthStore(tmp_path / "auth.db")
    yield s
    s.close()


@pytest.fixture
async def service(store: AuthStore) -> AsyncIterator[AuthService]:
    svc = AuthService(store, FAST, IdentitySettings())
    await svc.start()
    yield svc
