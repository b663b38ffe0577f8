"""Two auth replicas on one database (two stores: two pools or connections, as two processes have),
on both backends: what one replica does, the other sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tests.unit.auth.auth_testing import FAST, PASSWORD, settings

from services.auth.service import AuthService
from services.auth.store import AuthStore
from services.core.database import Location
from services.core.errors import ResourceExhausted, Unauthenticated
from services.core.identity import Identity, IdentitySettings


@pytest.fixture
async def replicas(database: Location) -> AsyncIterator[tuple[AuthService, AuthService]]:
    stores = [AuthStore(database), AuthStore(database)]
    services = [AuthService(s, FAST, IdentitySettings()) for s in stores]
    for service in services:
        await service.start()
    yield services[0], services[1]
    for s in stores:
        s.close()


async def test_concurrent_refreshes_on_both_replicas_get_one_successor(replicas: tuple[AuthService, AuthService]) -> None:
    """Two tabs refreshing at once, answered by two replicas: both get the same new refresh token
    and the sign-in stays alive (the grace window's state is in the database)."""
    a, b = replicas
    _, tokens = await a.register("alice", PASSWORD)
    for _ in range(3):
        results = await asyncio.gather(*(r.refresh(tokens.refresh_token) for r in (a, b) * 4))
        assert len({r.refresh_token for r in results}) == 1, results
        tokens = results[0]
    await b.refresh(tokens.refresh_token)


async def test_concurrent_wrong_passwords_on_both_replicas_stop_at_the_limit(
        replicas: tuple[AuthService, AuthService]) -> None:
    a, b = replicas
    await a.register("alice", PASSWORD)
    results = await asyncio.gather(*((a, b)[i % 2].login("alice", f"Wrong-password-{i}", f"10.0.0.{i}")
                                     for i in range(30)), return_exceptions=True)
    assert sum(isinstance(r, Unauthenticated) for r in results) == FAST.login_lockout_after, results
    assert all(isinstance(r, (Unauthenticated, ResourceExhausted)) for r in results)


async def test_failed_logins_are_counted_across_replicas(replicas: tuple[AuthService, AuthService]) -> None:
    a, b = replicas
    await a.register("alice", PASSWORD)
    for i in range(FAST.login_lockout_after):
        with pytest.raises(Unauthenticated):
            await (a, b)[i % 2].login("alice", "Wrong-password-1", f"10.0.0.{i}")
    for service in (a, b):  # locked out on both: N replicas do not give N times the attempts
        with pytest.raises(ResourceExhausted) as caught:
            await service.login("alice", PASSWORD, "10.0.1.1")
        assert 0 < (caught.value.retry_after or 0) <= FAST.login_lockout_seconds


async def test_api_key_revoked_on_one_replica_is_refused_by_the_other_at_once(
        replicas: tuple[AuthService, AuthService]) -> None:
    a, b = replicas
    user, _ = await a.register("alice", PASSWORD)
    who = Identity(user.id, "alice", frozenset({"user"}))
    key = await a.create_api_key(who, "laptop", 0)
    assert (await b.verify_api_key(key.secret)).user_id == user.id
    await a.delete_api_key(who, key.key.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await b.verify_api_key(key.secret)


async def test_replicas_starting_together_agree_on_the_admin_and_the_signing_keys(database: Location) -> None:
    stores = [AuthStore(database) for _ in range(3)]
    try:
        services = [AuthService(s, settings(admin_password=PASSWORD), IdentitySettings())
                    for s in stores]
        await asyncio.gather(*(s.start() for s in services))  # none fails on another's admin
        assert stores[0].user_by_key("admin") is not None
        # Whichever replica signed a token, every replica publishes its key.
        published = [{k["kid"] for k in await s.jwks()} for s in services]
        assert all(s.tokens.signing_kid in published[i] for s in services for i in range(3))
    finally:
        for s in stores:
            s.close()
