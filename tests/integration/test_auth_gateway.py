"""Auth through the real stack: REST via Envoy (401/403/429 with JSON bodies) and direct gRPC to the
auth process. The stack here is this module's own, because it needs an admin password, cheap argon2
and a quick lockout; the last test reads the auth service's log for leaked secrets."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import hmac
import json
import sqlite3
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.stack import Stack
from tests.integration.conftest import start_stack

ADMIN_PASSWORD = "Integration-Root-Pw-9"
PASSWORD = "correct-Horse-7"
LOCKOUT_AFTER = 4
REFRESH_GRACE_SECONDS = 1
# Everything secret this module handles; the log test checks that none of it was logged.
SECRETS: set[str] = {ADMIN_PASSWORD, PASSWORD}


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("auth-stack")
    running = start_stack(
        data_dir,
        PARLEY_ADMIN_PASSWORD=ADMIN_PASSWORD,
        PARLEY_LOG_LEVEL="DEBUG",
        PARLEY_ARGON2_MEMORY_KIB="8192",
        PARLEY_ARGON2_TIME_COST="1",
        PARLEY_LOGIN_SLOWDOWN_AFTER="2",
        PARLEY_LOGIN_SLOWDOWN_SECONDS="0.2",
        PARLEY_LOGIN_SLOWDOWN_MAX_SECONDS="0.4",
        PARLEY_LOGIN_LOCKOUT_AFTER=str(LOCKOUT_AFTER),
        PARLEY_LOGIN_ADDRESS_LOCKOUT_AFTER="500",
        PARLEY_LOGIN_LOCKOUT_SECONDS="30",
        PARLEY_REFRESH_REUSE_GRACE_SECONDS=str(REFRESH_GRACE_SECONDS),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(auth_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auth_stack.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_auth(auth_stack: Stack) -> Iterator[auth_pb2_grpc.AuthServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{auth_stack.common.auth_port}") as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


def register(http: httpx.Client, name: str | None = None) -> dict[str, Any]:
    name = name or f"u{uuid.uuid4().hex[:10]}"
    response = http.post("/v1/auth/register", json={"username": name, "password": PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    SECRETS.update({body["tokens"]["access_token"], body["tokens"]["refresh_token"]})
    return body


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def signing_key(stack: Stack) -> tuple[str, Ed25519PrivateKey]:
    with sqlite3.connect(stack.common.data_dir / "auth.db") as db:
        kid, pem = db.execute("SELECT kid, private_pem FROM signing_keys WHERE retired_at IS NULL").fetchone()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return kid, key


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": "parley", "aud": "parley", "sub": "nobody", "preferred_username": "mallory", "roles": ["user"],
            "iat": now, "nbf": now, "exp": now + 600, "jti": uuid.uuid4().hex}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': kid}).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def bad_headers(stack: Stack) -> dict[str, dict[str, str]]:
    """Authorization headers that must all be refused with UNAUTHENTICATED."""
    kid, key = signing_key(stack)
    public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    now = int(time.time())
    eddsa = {
        "expired": claims(iat=now - 1000, nbf=now - 1000, exp=now - 100),
        "not yet valid": claims(nbf=now + 3600),
        "issued in the future": claims(iat=now + 3600),
        "wrong audience": claims(aud="other"),
        "wrong issuer": claims(iss="other"),
    }
    tokens = {name: jwt.encode(c, key, algorithm="EdDSA", headers={"kid": kid}) for name, c in eddsa.items()}
    tokens["alg none"] = jwt.encode(claims(), None, algorithm="none", headers={"kid": kid})
    tokens["HS256 signed with the public key"] = hs256(claims(), public_raw, kid)
    tokens["bad signature"] = jwt.encode(claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA",
                                         headers={"kid": kid})
    tokens["unknown API key"] = "pk-" + "Z" * 43
    tokens["garbage"] = "abc.def.ghi"
    headers = {name: auth(token) for name, token in tokens.items()}
    headers["missing"] = {}
    headers["malformed header"] = {"authorization": "Token abc"}
    headers["empty bearer"] = {"authorization": "Bearer"}
    return headers


BAD_CASES = ("expired", "not yet valid", "issued in the future", "wrong audience", "wrong issuer", "alg none",
             "HS256 signed with the public key", "bad signature", "unknown API key", "garbage", "missing",
             "malformed header", "empty bearer")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_credentials_are_401_json_over_rest_and_unauthenticated_over_grpc(
        auth_stack: Stack, http: httpx.Client, grpc_auth: auth_pb2_grpc.AuthServiceStub, case: str) -> None:
    headers = bad_headers(auth_stack)[case]
    for path in ("/v1/users/me", "/v1/api-keys"):
        response = http.get(path, headers=headers)
        assert response.status_code == 401, (case, response.text)
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0] and body["message"]
    with pytest.raises(grpc.RpcError) as caught:
        grpc_auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=tuple(headers.items()), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == body["message"]


def test_revoked_api_key_is_401(http: httpx.Client, grpc_auth: auth_pb2_grpc.AuthServiceStub) -> None:
    user = register(http)
    token = user["tokens"]["access_token"]
    created = http.post("/v1/api-keys", json={"name": "old"}, headers=auth(token)).json()
    SECRETS.add(created["secret"])
    assert http.delete(f"/v1/api-keys/{created['api_key']['id']}", headers=auth(token)).status_code == 200
    response = http.get("/v1/users/me", headers=auth(created["secret"]))
    assert response.status_code == 401 and "revoked" in response.json()["message"]
    with pytest.raises(grpc.RpcError) as caught:
        grpc_auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=tuple(auth(created["secret"]).items()))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_only_rpc_is_403_for_a_user(http: httpx.Client, grpc_auth: auth_pb2_grpc.AuthServiceStub) -> None:
    token = register(http)["tokens"]["access_token"]
    response = http.post("/v1/auth/keys:rotate", json={}, headers=auth(token))
    assert response.status_code == 403
    assert response.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    with pytest.raises(grpc.RpcError) as caught:
        grpc_auth.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=tuple(auth(token).items()))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_register_me_and_public_endpoints(http: httpx.Client) -> None:
    body = register(http, "Carol-1")
    assert body["user"]["username"] == "Carol-1" and body["user"]["roles"] == ["ROLE_USER"]
    assert body["tokens"]["token_type"] == "Bearer" and body["tokens"]["expires_in"] == 900
    me = http.get("/v1/users/me", headers=auth(body["tokens"]["access_token"]))
    assert me.status_code == 200 and me.json()["id"] == body["user"]["id"]
    # Usernames are case-insensitive: the same name in other case is taken, and logs in.
    again = http.post("/v1/auth/register", json={"username": "carol-1", "password": PASSWORD})
    assert again.status_code == 409
    assert http.post("/v1/auth/login", json={"username": "CAROL-1", "password": PASSWORD}).status_code == 200
    weak = http.post("/v1/auth/register", json={"username": "dave1", "password": "dave1dave1dave1"})
    assert weak.status_code == 400 and "username" in weak.json()["message"]
    jwks = http.get("/v1/auth/jwks").json()
    assert jwks["keys"] and {k["alg"] for k in jwks["keys"]} == {"EdDSA"}
    # The internal credential service is not reachable through the gateway.
    internal = http.post("/internal/v1/api-keys:verify", json={"secret": "pk-x"})
    assert internal.status_code == 404


def test_refresh_rotation_and_reuse_detection(http: httpx.Client) -> None:
    first = register(http)["tokens"]
    second = http.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200
    second_tokens = second.json()["tokens"]
    SECRETS.update({second_tokens["access_token"], second_tokens["refresh_token"]})
    assert second_tokens["refresh_token"] != first["refresh_token"]
    assert http.get("/v1/users/me", headers=auth(second_tokens["access_token"])).status_code == 200
    # Re-using the first token after the grace window revokes the whole family, including the one
    # just issued.
    time.sleep(REFRESH_GRACE_SECONDS + 0.2)
    reuse = http.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401
    assert http.post("/v1/auth/refresh", json={"refresh_token": second_tokens["refresh_token"]}).status_code == 401


def test_two_tabs_refreshing_at_once_stay_signed_in(http: httpx.Client) -> None:
    first = register(http)["tokens"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: http.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}),
                                range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    tokens = [a.json()["tokens"] for a in answers]
    SECRETS.update(t[k] for t in tokens for k in ("access_token", "refresh_token"))
    assert len({t["refresh_token"] for t in tokens}) == 1
    following = http.post("/v1/auth/refresh", json={"refresh_token": tokens[0]["refresh_token"]})
    assert following.status_code == 200
    SECRETS.update(following.json()["tokens"][k] for k in ("access_token", "refresh_token"))


def test_logout_revokes_the_refresh_token(http: httpx.Client) -> None:
    tokens = register(http)["tokens"]
    assert http.post("/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}).status_code == 401
    out = http.post("/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]},
                    headers=auth(tokens["access_token"]))
    assert out.status_code == 200
    assert http.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 401


def test_api_key_create_list_use_revoke(http: httpx.Client) -> None:
    token = register(http)["tokens"]["access_token"]
    created = http.post("/v1/api-keys", json={"name": "laptop", "ttl_seconds": 3600}, headers=auth(token))
    assert created.status_code == 200, created.text
    key = created.json()
    secret = key["secret"]
    SECRETS.add(secret)
    assert secret.startswith("pk-") and key["api_key"]["prefix"] == secret[:10] and "expire_time" in key["api_key"]
    listed = http.get("/v1/api-keys", headers=auth(token)).json()["api_keys"]
    assert [k["name"] for k in listed] == ["laptop"] and "secret" not in listed[0]
    assert "last_used_time" not in listed[0]
    me = http.get("/v1/users/me", headers=auth(secret))
    assert me.status_code == 200
    # The key can manage keys too (it stands for its user) and its use is recorded.
    listed = http.get("/v1/api-keys", headers=auth(secret)).json()["api_keys"]
    assert "last_used_time" in listed[0]
    assert http.delete(f"/v1/api-keys/{key['api_key']['id']}", headers=auth(token)).status_code == 200
    assert http.get("/v1/users/me", headers=auth(secret)).status_code == 401
    assert http.get("/v1/api-keys", headers=auth(token)).json()["api_keys"] == []


def test_api_key_share_weight_is_set_and_changed_by_its_owner_only(http: httpx.Client) -> None:
    token, other = register(http)["tokens"]["access_token"], register(http)["tokens"]["access_token"]
    chat = http.post("/v1/api-keys", json={"name": "chat", "share_weight": 3}, headers=auth(token))
    batch = http.post("/v1/api-keys", json={"name": "batch"}, headers=auth(token))
    assert chat.status_code == batch.status_code == 200, (chat.text, batch.text)
    SECRETS.update({chat.json()["secret"], batch.json()["secret"]})
    assert (chat.json()["api_key"]["share_weight"], batch.json()["api_key"]["share_weight"]) == (3, 1)
    key_id = batch.json()["api_key"]["id"]
    changed = http.patch(f"/v1/api-keys/{key_id}", json={"share_weight": 0.5}, headers=auth(token))
    assert changed.status_code == 200, changed.text
    assert (changed.json()["name"], changed.json()["share_weight"]) == ("batch", 0.5)
    for body in ({"share_weight": 0}, {"share_weight": 1001}, {"share_weight": -2}):
        refused = http.patch(f"/v1/api-keys/{key_id}", json=body, headers=auth(token))
        assert refused.status_code == 400 and "share_weight" in refused.json()["message"], refused.text
    refused = http.post("/v1/api-keys", json={"name": "x", "share_weight": 0}, headers=auth(token))
    assert refused.status_code == 400 and "share_weight" in refused.json()["message"], refused.text
    assert http.patch(f"/v1/api-keys/{key_id}", json={"share_weight": 9}, headers=auth(other)).status_code == 404
    elsewhere = http.patch(f"/v1/api-keys/{key_id}", json={"id": chat.json()["api_key"]["id"], "share_weight": 9},
                           headers=auth(token))
    assert elsewhere.status_code == 400, elsewhere.text
    listed = http.get("/v1/api-keys", headers=auth(token)).json()["api_keys"]
    assert {k["name"]: k["share_weight"] for k in listed} == {"chat": 3, "batch": 0.5}


def test_admin_rotates_signing_key_without_logging_anyone_out(auth_stack: Stack, http: httpx.Client) -> None:
    user_token = register(http)["tokens"]["access_token"]
    login = http.post("/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
    assert login.status_code == 200 and "ROLE_ADMIN" in login.json()["user"]["roles"]
    admin_token = login.json()["tokens"]["access_token"]
    SECRETS.update({admin_token, login.json()["tokens"]["refresh_token"]})
    rotated = http.post("/v1/auth/keys:rotate", json={}, headers=auth(admin_token))
    assert rotated.status_code == 200
    kids = {k["kid"] for k in http.get("/v1/auth/jwks").json()["keys"]}
    assert rotated.json()["kid"] in kids and len(kids) >= 2
    assert http.get("/v1/users/me", headers=auth(user_token)).status_code == 200
    assert http.get("/v1/users/me", headers=auth(admin_token)).status_code == 200


def test_login_failures_slow_down_then_lock_out_with_429(http: httpx.Client) -> None:
    name = register(http)["user"]["username"]
    timings = []
    for _ in range(LOCKOUT_AFTER):
        started = time.monotonic()
        response = http.post("/v1/auth/login", json={"username": name, "password": "wrong-Password-1"})
        timings.append(time.monotonic() - started)
        assert response.status_code == 401 and response.json()["message"] == "wrong username or password"
    assert timings[-1] - timings[0] >= 0.15  # answers slowed down after the second failure
    locked = http.post("/v1/auth/login", json={"username": name, "password": PASSWORD})  # even the right one
    assert locked.status_code == 429
    assert locked.json()["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert 1 <= int(locked.headers["retry-after"]) <= 30
    # An unknown username is treated the same way: a lockout reveals nothing.
    ghost = f"ghost{uuid.uuid4().hex[:8]}"
    for _ in range(LOCKOUT_AFTER):
        assert http.post("/v1/auth/login", json={"username": ghost, "password": "x"}).status_code == 401
    assert http.post("/v1/auth/login", json={"username": ghost, "password": "x"}).status_code == 429


def test_unknown_username_costs_as_much_time_as_a_wrong_password(http: httpx.Client) -> None:
    known = [register(http)["user"]["username"] for _ in range(5)]
    unknown = [f"nobody{uuid.uuid4().hex[:8]}" for _ in range(5)]

    def attempt(name: str) -> float:
        started = time.monotonic()
        response = http.post("/v1/auth/login", json={"username": name, "password": "wrong-Password-1"})
        assert response.status_code == 401 and response.json()["message"] == "wrong username or password"
        return time.monotonic() - started

    known_t = statistics.median(attempt(n) for n in known)
    unknown_t = statistics.median(attempt(n) for n in unknown)
    assert 0.5 < unknown_t / known_t < 2.0, (known_t, unknown_t)


def test_no_secret_or_password_in_the_logs(auth_stack: Stack, http: httpx.Client) -> None:
    # One more full round so the test stands alone, then every log line of the auth service and
    # the gateway is searched for every secret this module has seen.
    tokens = register(http)["tokens"]
    http.post("/v1/auth/login", json={"username": "admin", "password": "Wrong-" + ADMIN_PASSWORD})
    refreshed = http.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).json()["tokens"]
    created = http.post("/v1/api-keys", json={"name": "k"}, headers=auth(refreshed["access_token"])).json()
    http.get("/v1/users/me", headers=auth(created["secret"]))
    SECRETS.update({refreshed["access_token"], refreshed["refresh_token"], created["secret"],
                    "Wrong-" + ADMIN_PASSWORD})
    time.sleep(0.3)  # let the log pumps catch up
    logs = {name: (auth_stack.log_dir / f"{name}.log").read_text() for name in ("auth", "gateway")}
    assert '"message": "login"' in logs["auth"]  # the log is there and has content
    for name, text in logs.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret ({secret[:4]}...) appears in {name}.log"
            # Nor a fragment long enough to matter (e.g. a token cut in half).
            assert secret[len(secret) // 2:][:16] not in text or len(secret) < 20
        assert "$argon2" not in text and "PRIVATE KEY" not in text
