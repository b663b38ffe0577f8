"""Accounts, sign-in, refresh rotation with re-use detection, API keys and signing keys, without gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import jwt
import pytest
from tests.unit.auth.auth_testing import FAST, PASSWORD, settings

from services.auth import app as auth_app
from services.auth.service import AuthService
from services.auth.store import AuthStore
from services.core.config import CommonSettings, ConfigError
from services.core.errors import (AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
                                  Unauthenticated)
from services.core.identity import CredentialVerifier, Identity, IdentitySettings
from services.core.sqlite import SqliteDatabase


def verifier(service: AuthService) -> CredentialVerifier:
    return CredentialVerifier(service.jwks, service.verify_api_key, IdentitySettings(jwks_refetch_seconds=0))


async def test_register_then_login_is_case_insensitive(service: AuthService) -> None:
    user, tokens = await service.register("Alice", PASSWORD)
    assert user.roles == ("user",)
    logged_in, _ = await service.login("ALICE", PASSWORD, "10.0.0.1")
    assert logged_in.id == user.id
    with pytest.raises(AlreadyExists):
        await service.register("alice", PASSWORD)
    identity = await verifier(service).authenticate(tokens.access_token)
    assert identity == Identity(user.id, "Alice", frozenset({"user"}))


async def test_registration_closed_by_default(store: AuthStore) -> None:
    closed = AuthService(store, settings(allow_registration=False), IdentitySettings())
    await closed.start()
    with pytest.raises(PermissionDenied, match="registration is closed"):
        await closed.register("alice", PASSWORD)
    # An operator can still create accounts (the CLI does this).
    await closed.create_user("alice", PASSWORD)


async def test_weak_password_refused_on_register(service: AuthService) -> None:
    with pytest.raises(InvalidArgument, match="too short"):
        await service.register("alice", "short1A")


async def test_wrong_password_and_unknown_user_look_the_same(service: AuthService) -> None:
    await service.register("alice", PASSWORD)
    messages = []
    for name in ("alice", "nobody"):
        with pytest.raises(Unauthenticated) as caught:
            await service.login(name, "wrong-Password-1", f"10.0.0.{len(name)}")
        messages.append(caught.value.message)
    assert messages[0] == messages[1] == "wrong username or password"


async def test_access_token_claims(service: AuthService) -> None:
    user, tokens = await service.register("alice", PASSWORD)
    header = jwt.get_unverified_header(tokens.access_token)
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    assert header["alg"] == "EdDSA" and header["kid"]
    assert claims["iss"] == "parley" and claims["aud"] == "parley" and claims["sub"] == user.id
    assert claims["roles"] == ["user"] and claims["jti"]
    assert claims["exp"] - claims["iat"] == FAST.access_token_ttl_seconds == tokens.expires_in


async def test_refresh_rotates_and_reuse_revokes_the_family(service: AuthService) -> None:
    _, first = await service.register("alice", PASSWORD)
    second = await service.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    third = await service.refresh(second.refresh_token)
    # The first token comes back (stolen?): refused, and every token of that session dies with it.
    with pytest.raises(Unauthenticated, match="no longer valid"):
        await service.refresh(first.refresh_token)
    with pytest.raises(Unauthenticated):
        await service.refresh(third.refresh_token)
    # Another session of the same user is unaffected.
    _, other = await service.login("alice", PASSWORD, "10.0.0.1")
    await service.refresh(other.refresh_token)


async def test_concurrent_refreshes_with_one_token_both_get_the_same_new_token(service: AuthService) -> None:
    """Two tabs refresh at once: both succeed with the same successor, and the sign-in lives on."""
    _, pair = await service.register("alice", PASSWORD)
    results = await asyncio.gather(*(service.refresh(pair.refresh_token) for _ in range(4)))
    assert len({r.refresh_token for r in results}) == 1 and results[0].refresh_token != pair.refresh_token
    # Either tab's next refresh works; the one after that with the same token is a concurrent one too.
    following = await service.refresh(results[1].refresh_token)
    await service.refresh(following.refresh_token)


async def test_reuse_after_the_grace_window_revokes_the_family(service: AuthService, store: AuthStore) -> None:
    _, pair = await service.register("alice", PASSWORD)
    second = await service.refresh(pair.refresh_token)
    with store._tx() as db:  # the first token was used longer ago than the grace window
        db.execute("UPDATE refresh_tokens SET used_at = used_at - ?", (FAST.refresh_reuse_grace_seconds + 1,))
    with pytest.raises(Unauthenticated, match="no longer valid"):
        await service.refresh(pair.refresh_token)
    with pytest.raises(Unauthenticated, match="no longer valid"):
        await service.refresh(second.refresh_token)


async def test_no_grace_without_the_setting_or_once_the_successor_is_used(store: AuthStore) -> None:
    strict = AuthService(store, settings(refresh_reuse_grace_seconds=0), IdentitySettings())
    await strict.start()
    _, pair = await strict.register("alice", PASSWORD)
    results = await asyncio.gather(strict.refresh(pair.refresh_token), strict.refresh(pair.refresh_token),
                                   return_exceptions=True)
    assert sum(isinstance(r, Unauthenticated) for r in results) == 1
    _, pair = await strict.login("alice", PASSWORD, "10.0.0.1")
    graceful = AuthService(store, FAST, IdentitySettings())
    await graceful.start()
    second = await graceful.refresh(pair.refresh_token)
    await graceful.refresh(second.refresh_token)  # the successor is used: the first token is stale now
    with pytest.raises(Unauthenticated, match="no longer valid"):
        await graceful.refresh(pair.refresh_token)


async def test_concurrent_wrong_passwords_get_no_more_tries_than_sequential_ones(service: AuthService) -> None:
    await service.register("alice", PASSWORD)
    results = await asyncio.gather(*(service.login("alice", f"Wrong-password-{i}", f"10.0.0.{i}") for i in range(30)),
                                   return_exceptions=True)
    checked = [r for r in results if isinstance(r, Unauthenticated)]
    assert len(checked) == FAST.login_lockout_after, results
    assert all(isinstance(r, (Unauthenticated, ResourceExhausted)) for r in results)
    with pytest.raises(ResourceExhausted):  # locked out, right password or not
        await service.login("alice", PASSWORD, "10.0.1.1")


async def test_expired_and_unknown_refresh_tokens(store: AuthStore) -> None:
    svc = AuthService(store, settings(refresh_token_ttl_seconds=60), IdentitySettings())
    await svc.start()
    _, pair = await svc.register("alice", PASSWORD)
    with pytest.raises(Unauthenticated, match="invalid refresh token"):
        await svc.refresh("made-up")
    with store._tx() as db:  # age the token past its expiry
        db.execute("UPDATE refresh_tokens SET expires_at = ?", (time.time() - 1,))
    with pytest.raises(Unauthenticated, match="expired"):
        await svc.refresh(pair.refresh_token)


async def test_logout_revokes_the_session_and_only_for_its_owner(service: AuthService) -> None:
    alice, pair = await service.register("alice", PASSWORD)
    bob, _ = await service.register("bobby", PASSWORD)
    with pytest.raises(NotFound):
        await service.logout(Identity(bob.id, "bobby", frozenset({"user"})), pair.refresh_token)
    await service.logout(Identity(alice.id, "alice", frozenset({"user"})), pair.refresh_token)
    with pytest.raises(Unauthenticated):
        await service.refresh(pair.refresh_token)


async def test_reset_password_signs_out_everywhere(service: AuthService) -> None:
    _, pair = await service.register("alice", PASSWORD)
    await service.reset_password("ALICE", "another-Secret-9")
    with pytest.raises(Unauthenticated):
        await service.refresh(pair.refresh_token)
    with pytest.raises(Unauthenticated):
        await service.login("alice", PASSWORD, "10.0.0.1")
    await service.login("alice", "another-Secret-9", "10.0.0.1")


async def test_admin_bootstrap_and_roles(store: AuthStore) -> None:
    svc = AuthService(store, settings(admin_password="Root-Secret-42"), IdentitySettings())
    await svc.start()
    admin, _ = await svc.login("admin", "Root-Secret-42", "10.0.0.1")
    assert set(admin.roles) == {"user", "admin"}
    # A later start with another password does not reset the existing admin.
    again = AuthService(store, settings(admin_password="Other-Secret-42"), IdentitySettings())
    await again.start()
    await again.login("admin", "Root-Secret-42", "10.0.0.1")
    user = await svc.set_roles("admin", ())
    assert user.roles == ("user",)


async def test_weak_admin_password_stops_startup(store: AuthStore) -> None:
    svc = AuthService(store, settings(admin_password="admin"), IdentitySettings())
    with pytest.raises(ConfigError, match="PARLEY_ADMIN_PASSWORD"):
        await svc.start()


async def test_signing_key_rotation_keeps_old_tokens_valid(service: AuthService) -> None:
    user, old = await service.register("alice", PASSWORD)
    check = verifier(service)
    admin = Identity("x", "root", frozenset({"user", "admin"}))
    with pytest.raises(PermissionDenied):
        await service.rotate_signing_key(Identity(user.id, "alice", frozenset({"user"})))
    old_kid = jwt.get_unverified_header(old.access_token)["kid"]
    new_kid = await service.rotate_signing_key(admin)
    assert new_kid != old_kid
    assert {k["kid"] for k in await service.jwks()} == {old_kid, new_kid}
    _, new = await service.login("alice", PASSWORD, "10.0.0.1")
    assert jwt.get_unverified_header(new.access_token)["kid"] == new_kid
    assert (await check.authenticate(old.access_token)).user_id == user.id
    assert (await check.authenticate(new.access_token)).user_id == user.id


async def test_retired_keys_leave_the_jwks_after_their_tokens_expire(service: AuthService, store: AuthStore) -> None:
    first = (await service.jwks())[0]["kid"]
    await service.rotate_signing_key(Identity("x", "root", frozenset({"admin"})))
    with store._tx() as db:
        db.execute("UPDATE signing_keys SET verify_until = ? WHERE kid = ?", (time.time() - 1, first))
    assert first not in {k["kid"] for k in await service.jwks()}


async def test_signing_keys_survive_a_restart(store: AuthStore) -> None:
    svc = AuthService(store, FAST, IdentitySettings())
    await svc.start()
    _, pair = await svc.register("alice", PASSWORD)
    restarted = AuthService(store, FAST, IdentitySettings())
    await restarted.start()
    assert (await verifier(restarted).authenticate(pair.access_token)).username == "alice"


async def test_api_key_lifecycle(service: AuthService) -> None:
    user, _ = await service.register("alice", PASSWORD)
    me = Identity(user.id, "alice", frozenset({"user"}))
    created = await service.create_api_key(me, "laptop", 0)
    assert created.secret.startswith("pk-") and created.key.prefix == created.secret[:10]
    assert created.key.expires_at is None and created.key.last_used_at is None
    identity = await service.verify_api_key(created.secret)
    assert (identity.user_id, identity.api_key_id) == (user.id, created.key.id)
    keys, _ = await service.list_api_keys(me, 0, "")
    assert [k.name for k in keys] == ["laptop"] and keys[0].last_used_at is not None
    # Nobody else can revoke it.
    with pytest.raises(NotFound):
        await service.delete_api_key(Identity("someone", "eve", frozenset({"user"})), created.key.id)
    await service.delete_api_key(me, created.key.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await service.verify_api_key(created.secret)
    assert (await service.list_api_keys(me, 0, ""))[0] == []


async def test_api_key_expiry_and_validation(service: AuthService, store: AuthStore) -> None:
    user, _ = await service.register("alice", PASSWORD)
    me = Identity(user.id, "alice", frozenset({"user"}))
    with pytest.raises(InvalidArgument):
        await service.create_api_key(me, "  ", 0)
    with pytest.raises(InvalidArgument):
        await service.create_api_key(me, "x", -5)
    created = await service.create_api_key(me, "short-lived", 60)
    assert created.key.expires_at is not None
    with store._tx() as db:
        db.execute("UPDATE api_keys SET expires_at = ?", (time.time() - 1,))
    with pytest.raises(Unauthenticated, match="expired"):
        await service.verify_api_key(created.secret)
    with pytest.raises(Unauthenticated):
        await service.verify_api_key("pk-made-up")


async def test_api_key_share_weight_is_set_changed_and_verified(service: AuthService) -> None:
    user, _ = await service.register("alice", PASSWORD)
    me = Identity(user.id, "alice", frozenset({"user"}))
    batch = await service.create_api_key(me, "batch", 0)
    interactive = await service.create_api_key(me, "chat", 0, share_weight=3)
    assert (batch.key.share_weight, interactive.key.share_weight) == (1.0, 3.0)
    assert (await service.verify_api_key(interactive.secret)).api_key_weight == 3.0
    changed = await service.update_api_key(me, batch.key.id, None, 0.5)
    assert (changed.name, changed.share_weight) == ("batch", 0.5)
    assert (await service.verify_api_key(batch.secret)).api_key_weight == 0.5
    renamed = await service.update_api_key(me, batch.key.id, " nightly ", None)
    assert (renamed.name, renamed.share_weight) == ("nightly", 0.5)
    keys, _ = await service.list_api_keys(me, 0, "")
    assert {k.name: k.share_weight for k in keys} == {"nightly": 0.5, "chat": 3.0}
    # Only the owner may change a key: another user's key is not found, and stays as it was.
    eve, _ = await service.register("eve", PASSWORD)
    with pytest.raises(NotFound):
        await service.update_api_key(Identity(eve.id, "eve", frozenset({"user"})), interactive.key.id, None, 1000)
    with pytest.raises(NotFound):
        await service.update_api_key(me, "no-such-key", None, 2)
    await service.delete_api_key(me, batch.key.id)
    with pytest.raises(NotFound):
        await service.update_api_key(me, batch.key.id, None, 2)
    assert (await service.verify_api_key(interactive.secret)).api_key_weight == 3.0


@pytest.mark.parametrize("weight", [0.0, -1.0, 1000.5, float("nan"), float("inf")])
async def test_api_key_share_weight_out_of_range_is_refused(service: AuthService, weight: float) -> None:
    user, _ = await service.register("alice", PASSWORD)
    me = Identity(user.id, "alice", frozenset({"user"}))
    with pytest.raises(InvalidArgument, match="share_weight must be greater than 0 and at most 1000"):
        await service.create_api_key(me, "bad", 0, share_weight=weight)
    key = await service.create_api_key(me, "good", 0, share_weight=1000)
    with pytest.raises(InvalidArgument, match="share_weight"):
        await service.update_api_key(me, key.key.id, None, weight)
    assert (await service.list_api_keys(me, 0, ""))[0][0].share_weight == 1000


async def test_api_key_pagination(service: AuthService) -> None:
    user, _ = await service.register("alice", PASSWORD)
    me = Identity(user.id, "alice", frozenset({"user"}))
    for i in range(5):
        await service.create_api_key(me, f"key-{i}", 0)
    seen, token = [], ""
    while True:
        page, token = await service.list_api_keys(me, 2, token)
        seen += [k.name for k in page]
        if not token:
            break
    assert seen == [f"key-{i}" for i in range(5)]
    with pytest.raises(InvalidArgument):
        await service.list_api_keys(me, 2, "garbage!")


async def test_changed_hash_cost_upgrades_the_stored_hash(service: AuthService, store: AuthStore) -> None:
    user, _ = await service.register("alice", PASSWORD)
    stronger = AuthService(store, dataclasses.replace(FAST, argon2_time_cost=2), IdentitySettings())
    await stronger.start()
    await stronger.login("alice", PASSWORD, "10.0.0.1")
    stored = store.user_by_id(user.id)
    assert stored is not None and "t=2" in stored.password_hash


def test_defaults_are_closed_and_secrets_are_masked() -> None:
    from services.auth.settings import AuthSettings
    from services.core import config

    defaults = config.load(AuthSettings, {})
    assert defaults.allow_registration is False and defaults.admin_password == ""
    assert defaults.access_token_ttl_seconds == 900 and defaults.argon2_memory_kib >= 19456
    loaded = config.load(AuthSettings, {"PARLEY_ADMIN_PASSWORD": "Root-Secret-42", "PARLEY_ALLOW_REGISTRATION": "true"})
    assert loaded.allow_registration and config.describe(loaded)["admin_password"] == "***"
    identity = config.load(IdentitySettings, {})
    assert (identity.jwt_issuer, identity.jwt_audience) == ("parley", "parley")
    with pytest.raises(ConfigError, match="PARLEY_LOGIN_LOCKOUT_AFTER"):
        config.load(AuthSettings, {"PARLEY_LOGIN_LOCKOUT_AFTER": "1", "PARLEY_LOGIN_SLOWDOWN_AFTER": "3"})


async def test_no_database_call_runs_on_the_event_loop(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database call on the loop (a slow SQLite lock, a PostgreSQL outage: up to the pool timeout)
    would stall every other call the service is serving; from start-up to close, none is made there."""
    on_loop: list[str] = []
    loop_thread = threading.get_ident()

    def watched(name: str) -> None:
        real = getattr(SqliteDatabase, name)

        def call(self: SqliteDatabase, *args: object, **kwargs: object) -> object:
            if threading.get_ident() == loop_thread:
                on_loop.append(name)
            return real(self, *args, **kwargs)
        monkeypatch.setattr(SqliteDatabase, name, call)

    for name in ("transaction", "read", "close"):
        watched(name)
    spec = await auth_app.build(CommonSettings(data_dir=tmp_path), settings(admin_password=PASSWORD),
                                IdentitySettings())
    service: AuthService = spec.registrations[0].servicer._service
    _, pair = await service.register("alice", PASSWORD)
    await service.refresh(pair.refresh_token)
    with pytest.raises(Unauthenticated):
        await service.login("alice", "Wrong-password-1", "10.0.0.1")
    await service.login("alice", PASSWORD, "10.0.0.1")
    await spec.close()
    assert on_loop == []
