"""The identity interceptor over real gRPC, in-process: the auth service (local verification) and a
stand-in "other service" that verifies through the auth service like session/inference will.

Every bad-credential case must answer UNAUTHENTICATED, role failures PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from tests.unit.auth.auth_testing import FAST, PASSWORD
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.session.v1 import session_pb2, session_pb2_grpc

from services.auth import client as auth_client
from services.auth import app as auth_app
from services.core import identity
from services.core.config import CommonSettings
from services.core.identity import CredentialVerifier, IdentityInterceptor, IdentitySettings
from services.core.server import Registration, RunningServer, ServiceSpec, start_server

SESSION = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


class EchoSession(session_pb2_grpc.SessionServiceServicer):
    """Answers with what it learnt about the caller; GetSession also calls auth on the caller's behalf."""

    def __init__(self, auth_target: str) -> None:
        self.channel = grpc.aio.insecure_channel(auth_target)

    async def GetSession(self, request: Any, context: Any) -> session_pb2.Session:
        who = identity.current_identity()
        me = await auth_pb2_grpc.AuthServiceStub(self.channel).GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=identity.forward_credentials())
        return session_pb2.Session(id=who.user_id, title=who.username, model=who.api_key_id or "",
                                   system_prompt=me.username)

    async def DeleteSession(self, request: Any, context: Any) -> session_pb2.DeleteSessionResponse:
        return session_pb2.DeleteSessionResponse()

    async def Chat(self, request: Any, context: Any) -> AsyncIterator[session_pb2.ChatResponse]:
        who = identity.current_identity()
        for part in (who.username, ",".join(sorted(who.roles))):
            yield session_pb2.ChatResponse(delta=session_pb2.ChatDelta(text=part))


@dataclasses.dataclass
class Env:
    auth: auth_pb2_grpc.AuthServiceStub
    session: session_pb2_grpc.SessionServiceStub
    data_dir: Path
    verifier: CredentialVerifier

    def private_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The auth service's current signing key, read from its store (to forge tokens in tests)."""
        with sqlite3.connect(self.data_dir / "auth.db") as db:
            kid, pem = db.execute(
                "SELECT kid, private_pem FROM signing_keys WHERE retired_at IS NULL").fetchone()
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return kid, key

    async def login(self, username: str, roles_admin: bool = False) -> auth_pb2.TokenPair:
        response = await self.auth.Register(auth_pb2.RegisterRequest(username=username, password=PASSWORD))
        return response.tokens


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    common = CommonSettings(data_dir=tmp_path)
    spec = await auth_app.build(common, FAST, IdentitySettings())
    auth_server = await start_server(spec, port=0)
    target = f"127.0.0.1:{auth_server.port}"
    remote = dataclasses.replace(common, auth_target=target)
    verifier = auth_client.remote_verifier(remote, IdentitySettings(api_key_cache_seconds=30, jwks_refetch_seconds=0))
    session_spec = ServiceSpec(
        name="session",
        registrations=[Registration(SESSION, session_pb2_grpc.add_SessionServiceServicer_to_server,
                                    EchoSession(target))],
        interceptors=[IdentityInterceptor(verifier, roles={f"/{SESSION}/DeleteSession": ("admin",)})],
    )
    session_server: RunningServer = await start_server(session_spec, port=0)
    channels = [grpc.aio.insecure_channel(target), grpc.aio.insecure_channel(f"127.0.0.1:{session_server.port}")]
    yield Env(auth_pb2_grpc.AuthServiceStub(channels[0]), session_pb2_grpc.SessionServiceStub(channels[1]),
              tmp_path, verifier)
    for channel in channels:
        await channel.close()
    await session_server.stop(0)
    await auth_server.stop(0)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def expect(code: grpc.StatusCode, call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": "parley", "aud": "parley", "sub": "u1", "preferred_username": "mallory", "roles": ["user", "admin"],
            "iat": now, "nbf": now, "exp": now + 600, "jti": uuid.uuid4().hex}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


async def test_valid_token_reaches_handlers_as_one_identity(env: Env) -> None:
    tokens = await env.login("alice")
    me = await env.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token))
    assert me.username == "alice" and list(me.roles) == [auth_pb2.ROLE_USER]
    # Another service: verified against the cached JWKS; the credential is forwarded to auth.
    session = await env.session.GetSession(session_pb2.GetSessionRequest(id="x"), metadata=bearer(tokens.access_token))
    assert (session.id, session.title, session.model, session.system_prompt) == (me.id, "alice", "", "alice")
    events = [e async for e in env.session.Chat(session_pb2.ChatRequest(session_id="x"),
                                                metadata=bearer(tokens.access_token))]
    assert [e.delta.text for e in events] == ["alice", "user"]


async def test_public_methods_need_no_credentials(env: Env) -> None:
    jwks = await env.auth.GetJwks(auth_pb2.GetJwksRequest())
    assert jwks.keys and jwks.keys[0].kty == "OKP" and jwks.keys[0].crv == "Ed25519" and jwks.keys[0].alg == "EdDSA"
    tokens = await env.login("alice")
    await env.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=tokens.refresh_token))


def hs256(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    """An HS256 token built by hand: PyJWT refuses to use an asymmetric key as an HMAC secret, an
    attacker's code does not."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': kid}).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def bad_credentials(env: Env) -> dict[str, tuple[tuple[str, str], ...]]:
    kid, key = env.private_key()
    public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    other = Ed25519PrivateKey.generate()
    good = jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": kid})
    head, body, sig = good.split(".")
    tampered_body = base64.urlsafe_b64encode(
        jwt.utils.base64url_decode(body).replace(b'"mallory"', b'"alice00"')).rstrip(b"=").decode()
    signed = {
        "alg none": jwt.encode(claims(), None, algorithm="none", headers={"kid": kid}),
        "HS256 with the public key": hs256(claims(), public_raw, kid),
        "HS256 with the public PEM": hs256(claims(), public_pem, kid),
        "HS256 with the JWK x": hs256(claims(), base64.urlsafe_b64encode(public_raw).rstrip(b"=") , kid),
        "signed by another key": jwt.encode(claims(), other, algorithm="EdDSA", headers={"kid": kid}),
        "tampered payload": f"{head}.{tampered_body}.{sig}",
        "unknown kid": jwt.encode(claims(), other, algorithm="EdDSA", headers={"kid": "nope"}),
        "no kid": jwt.encode(claims(), key, algorithm="EdDSA"),
        "expired": jwt.encode(claims(exp=int(time.time()) - 60, iat=int(time.time()) - 700,
                                     nbf=int(time.time()) - 700), key, algorithm="EdDSA", headers={"kid": kid}),
        "not yet valid (nbf)": jwt.encode(claims(nbf=int(time.time()) + 600), key, algorithm="EdDSA",
                                          headers={"kid": kid}),
        "issued in the future": jwt.encode(claims(iat=int(time.time()) + 600), key, algorithm="EdDSA",
                                           headers={"kid": kid}),
        "wrong audience": jwt.encode(claims(aud="someone-else"), key, algorithm="EdDSA", headers={"kid": kid}),
        "wrong issuer": jwt.encode(claims(iss="evil"), key, algorithm="EdDSA", headers={"kid": kid}),
        "no expiry": jwt.encode(claims(exp=None), key, algorithm="EdDSA", headers={"kid": kid}),
        "garbage": "not-a-jwt",
        "unknown API key": "pk-" + "A" * 43,
    }
    cases = {name: bearer(token) for name, token in signed.items()}
    cases["missing"] = ()
    cases["basic scheme"] = (("authorization", "Basic YWxpY2U6cHc="),)
    cases["bearer without token"] = (("authorization", "Bearer"),)
    cases["two tokens"] = (("authorization", f"Bearer {good} {good}"),)
    cases["two headers"] = (("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}"))
    return cases


async def test_bad_credentials_are_unauthenticated_on_both_services(env: Env) -> None:
    await env.login("alice")  # the JWKS holds the key; the session service fetched nothing yet
    for name, metadata in bad_credentials(env).items():
        on_auth = await expect(grpc.StatusCode.UNAUTHENTICATED,
                               env.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=metadata))
        on_other = await expect(grpc.StatusCode.UNAUTHENTICATED,
                                env.session.GetSession(session_pb2.GetSessionRequest(id="x"), metadata=metadata))
        assert on_auth == on_other, name
        # Server-streaming methods are guarded the same way, before the first message.
        stream = env.session.Chat(session_pb2.ChatRequest(session_id="x"), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pytest.fail(f"{name}: a stream started without valid credentials")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name


async def test_messages_say_what_is_wrong(env: Env) -> None:
    cases = bad_credentials(env)
    details = {name: await expect(grpc.StatusCode.UNAUTHENTICATED,
                                  env.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=cases[name]))
               for name in ("missing", "expired", "wrong audience", "wrong issuer", "basic scheme",
                            "signed by another key", "issued in the future")}
    assert "missing credentials" in details["missing"]
    assert "expired" in details["expired"]
    assert "audience" in details["wrong audience"]
    assert "issuer" in details["wrong issuer"]
    assert "malformed" in details["basic scheme"]
    assert "signature" in details["signed by another key"]
    assert "not valid yet" in details["issued in the future"]


async def test_roles_give_permission_denied(env: Env) -> None:
    user = await env.login("alice")
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 env.auth.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=bearer(user.access_token)))
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 env.session.DeleteSession(session_pb2.DeleteSessionRequest(id="x"), metadata=bearer(user.access_token)))
    # A token forged with the admin role still needs the real signature; a real one passes.
    kid, key = env.private_key()
    admin = jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": kid})
    await env.session.DeleteSession(session_pb2.DeleteSessionRequest(id="x"), metadata=bearer(admin))


async def test_rotation_reaches_other_services_without_logging_anyone_out(env: Env) -> None:
    user = await env.login("alice")
    await env.session.GetSession(session_pb2.GetSessionRequest(id="x"), metadata=bearer(user.access_token))
    kid, key = env.private_key()
    admin = jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": kid})
    new_kid = (await env.auth.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=bearer(admin))).kid
    assert new_kid != kid
    fresh = await env.auth.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD))
    assert jwt.get_unverified_header(fresh.tokens.access_token)["kid"] == new_kid
    # The session service has only the old key cached: the new kid triggers a refetch.
    for token in (user.access_token, fresh.tokens.access_token):
        s = await env.session.GetSession(session_pb2.GetSessionRequest(id="x"), metadata=bearer(token))
        assert s.title == "alice"


async def test_unknown_kids_refetch_at_most_once_per_interval() -> None:
    fetches = 0

    async def fetch() -> list[dict[str, str]]:
        nonlocal fetches
        fetches += 1
        return []

    async def no_keys(secret: str) -> identity.Identity:
        raise AssertionError

    verifier = CredentialVerifier(fetch, no_keys, IdentitySettings(jwks_refetch_seconds=60))
    other = Ed25519PrivateKey.generate()
    for i in range(20):
        token = jwt.encode(claims(), other, algorithm="EdDSA", headers={"kid": f"k{i}"})
        with pytest.raises(identity.Unauthenticated):
            await verifier.authenticate(token)
    assert fetches == 1


async def test_api_keys_work_everywhere_and_revocation(env: Env) -> None:
    user = await env.login("alice")
    created = await env.auth.CreateApiKey(auth_pb2.CreateApiKeyRequest(name="ci"), metadata=bearer(user.access_token))
    key = created.secret
    me = await env.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(key))
    session = await env.session.GetSession(session_pb2.GetSessionRequest(id="x"), metadata=bearer(key))
    assert (me.username, session.title, session.model) == ("alice", "alice", created.api_key.id)
    await env.auth.DeleteApiKey(auth_pb2.DeleteApiKeyRequest(id=created.api_key.id), metadata=bearer(key))
    # The auth service itself stops accepting it at once...
    await expect(grpc.StatusCode.UNAUTHENTICATED,
                 env.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(key)))
    # ...other services once their short cache entry lapses (30 s here; cleared to skip the wait).
    env.verifier._api_keys.clear()
    await expect(grpc.StatusCode.UNAUTHENTICATED,
                 env.session.GetSession(session_pb2.GetSessionRequest(id="x"), metadata=bearer(key)))


async def test_api_key_weight_reaches_other_services_once_their_cache_lapses(env: Env) -> None:
    user, eve = await env.login("alice"), await env.login("eve")
    created = await env.auth.CreateApiKey(auth_pb2.CreateApiKeyRequest(name="chat", share_weight=3),
                                          metadata=bearer(user.access_token))
    assert created.api_key.share_weight == 3
    assert (await env.verifier.authenticate(created.secret)).api_key_weight == 3
    change = auth_pb2.UpdateApiKeyRequest(api_key=auth_pb2.ApiKey(id=created.api_key.id, share_weight=5))
    await expect(grpc.StatusCode.NOT_FOUND, env.auth.UpdateApiKey(change, metadata=bearer(eve.access_token)))
    updated = await env.auth.UpdateApiKey(change, metadata=bearer(user.access_token))
    assert (updated.name, updated.share_weight) == ("chat", 5)
    bad = auth_pb2.UpdateApiKeyRequest(api_key=auth_pb2.ApiKey(id=created.api_key.id, share_weight=0))
    said = await expect(grpc.StatusCode.INVALID_ARGUMENT,
                        env.auth.UpdateApiKey(bad, metadata=bearer(user.access_token)))
    assert "share_weight" in said
    # Other services trust their cached verification for api_key_cache_seconds (cleared to skip the wait).
    assert (await env.verifier.authenticate(created.secret)).api_key_weight == 3
    env.verifier._api_keys.clear()
    assert (await env.verifier.authenticate(created.secret)).api_key_weight == 5


async def test_x_api_key_carries_the_same_credentials_as_anthropic_clients_send_them(env: Env) -> None:
    user = await env.login("alice")
    created = await env.auth.CreateApiKey(auth_pb2.CreateApiKeyRequest(name="sdk"), metadata=bearer(user.access_token))
    for credential in (created.secret, user.access_token):
        me = await env.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=(("x-api-key", credential),))
        assert me.username == "alice"
    # authorization wins when both come: a wrong key beside a valid bearer changes nothing, and the reverse fails.
    both = (*bearer(created.secret), ("x-api-key", "pk-wrong"))
    assert (await env.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=both)).username == "alice"
    await expect(grpc.StatusCode.UNAUTHENTICATED, env.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=(*bearer("pk-wrong"), ("x-api-key", created.secret))))
    said = await expect(grpc.StatusCode.UNAUTHENTICATED, env.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=(("x-api-key", "two words"),)))
    assert "x-api-key" in said


async def test_api_key_verification_is_cached(env: Env) -> None:
    user = await env.login("alice")
    created = await env.auth.CreateApiKey(auth_pb2.CreateApiKeyRequest(name="ci"), metadata=bearer(user.access_token))
    await env.session.GetSession(session_pb2.GetSessionRequest(id="x"), metadata=bearer(created.secret))
    await env.auth.DeleteApiKey(auth_pb2.DeleteApiKeyRequest(id=created.api_key.id),
                                metadata=bearer(user.access_token))
    # Still accepted from the cache by the other service (the documented trade-off of a 30 s cache);
    # Chat, unlike GetSession, does not call the auth service, which refuses the key at once.
    events = [e async for e in env.session.Chat(session_pb2.ChatRequest(session_id="x"),
                                                metadata=bearer(created.secret))]
    assert events[0].delta.text == "alice"


async def test_auth_down_is_unavailable_not_unauthenticated(tmp_path: Path) -> None:
    from services.stack import free_port

    common = CommonSettings(data_dir=tmp_path, auth_target=f"127.0.0.1:{free_port()}")
    verifier = auth_client.remote_verifier(common, IdentitySettings())
    with pytest.raises(identity.Unavailable):
        await verifier.authenticate(jwt.encode(claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA",
                                               headers={"kid": "k"}))
    with pytest.raises(identity.Unavailable):
        await verifier.authenticate("pk-" + "B" * 43)


def test_identity_repr_never_shows_the_credential() -> None:
    who = identity.Identity("u1", "alice", frozenset({"user"}), credential="pk-secret-value")
    assert "pk-secret-value" not in repr(who)
    assert identity.forward_credentials(who) == (("authorization", "Bearer pk-secret-value"),)
    assert identity.forward_credentials(None) == ()


async def test_interceptor_helper_treats_only_the_documented_methods_as_public(tmp_path: Path) -> None:
    guard = auth_client.interceptor(CommonSettings(data_dir=tmp_path))
    public = ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
              "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
              "/parley.auth.v1.AuthService/Register", "/parley.auth.v1.AuthService/Login",
              "/parley.auth.v1.AuthService/Refresh", "/parley.auth.v1.AuthService/GetJwks",
              "/parley.auth.v1.CredentialService/VerifyApiKey"]
    private = ["/parley.auth.v1.AuthService/Logout", "/parley.auth.v1.AuthService/GetCurrentUser",
               "/parley.auth.v1.AuthService/RotateSigningKey", f"/{SESSION}/Chat",
               "/parley.inference.v1.InferenceService/CreateChatCompletion"]
    assert all(guard.is_public(m) for m in public)
    assert not any(guard.is_public(m) for m in private)


async def test_concurrent_callers_each_see_their_own_identity(env: Env) -> None:
    alice, bob = await env.login("alice"), await env.login("bobby")
    calls = [env.session.Chat(session_pb2.ChatRequest(session_id="x"), metadata=bearer(t.access_token))
             for t in (alice, bob) * 10]

    async def first_text(call: Any) -> str:
        return [e.delta.text async for e in call][0]

    assert await asyncio.gather(*(first_text(c) for c in calls)) == ["alice", "bobby"] * 10
