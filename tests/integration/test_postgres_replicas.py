"""The stack on PostgreSQL and Redis with two auth, two session and two cache replicas behind Envoy: the full path
(register, login, a session, a chat turn with the real model), one running turn per session across
replicas (409), a replica SIGKILLed mid-turn (the other serves; the partial answer is kept; the
lease expires), failed sign-ins counted across replicas, concurrent refreshes (one new token for all), an API key
revoked on one replica refused by the other, a token budget and the usage ledger seen alike by
every replica, and a database outage (503 with Retry-After, then
service again) — with the database URL's password in no log."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.cache.v1 import cache_pb2, cache_pb2_grpc
from parley.inference.v1 import inference_pb2
from parley.session.v1 import session_pb2, session_pb2_grpc

from services.stack import Stack
from tests.integration.chat import chat, create_session, messages, text_of
from tests.integration.conftest import ADMIN_PASSWORD, Caller, sign_in, stack_env
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer

PASSWORD = "Replicated-passphrase-31"
LEASE_SECONDS = 3.0
LOCKOUT_AFTER = 4
# The end-of-turn tokens are banned: an answer that ends on its own leaves no running turn to test.
ENDLESS = inference_pb2.SamplingParams(max_tokens=400, temperature=0.8, logit_bias={0: -100, 2: -100})


@pytest.fixture(scope="module")
def replicated(postgres: PostgresServer, redis: RedisServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("replicated")
    env = stack_env(data_dir, PARLEY_DATABASE_URL=postgres.create_database(), PARLEY_REDIS_URL=redis.url,
                    PARLEY_PARALLEL_SLOTS="3",
                    PARLEY_CONTEXT_LENGTH="1024", PARLEY_CHECKPOINT_SECONDS="0.2",
                    PARLEY_TURN_LEASE_SECONDS=str(LEASE_SECONDS), PARLEY_LOGIN_LOCKOUT_AFTER=str(LOCKOUT_AFTER),
                    PARLEY_LOGIN_SLOWDOWN_AFTER="3", PARLEY_LOGIN_SLOWDOWN_SECONDS="0.01",
                    PARLEY_ARGON2_MEMORY_KIB="1024", PARLEY_ARGON2_TIME_COST="1",
                    PARLEY_DATABASE_POOL_TIMEOUT_SECONDS="2", PARLEY_DATABASE_CONNECT_TIMEOUT_SECONDS="2")
    stack = Stack(env=env, log_dir=data_dir / "logs", replicas={"auth": 2, "session": 2, "cache": 2})
    stack.start()
    try:
        stack.wait_healthy(timeout=180)
        yield stack
    finally:
        stack.stop()
    logs = "".join(p.read_text(errors="replace") for p in (data_dir / "logs").glob("*.log"))
    assert "database" in logs and postgres.password not in logs


@pytest.fixture(scope="module")
def user(replicated: Stack) -> Caller:
    return sign_in(replicated.url, f"rep-{uuid.uuid4().hex[:6]}", PASSWORD, register=True)


def session_stub(stack: Stack, replica: int) -> tuple[grpc.Channel, session_pb2_grpc.SessionServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.replicas('session')[replica].port}")
    return channel, session_pb2_grpc.SessionServiceStub(channel)


def test_register_login_session_and_a_chat_turn_through_envoy(replicated: Stack, user: Caller) -> None:
    assert [p.name for p in replicated.replicas("session")] == ["session", "session-2"]
    with httpx.Client(base_url=replicated.url, timeout=60) as http:
        sid = create_session(http, user, title="On PostgreSQL")["id"]
        events = chat(http, user, sid, "Say hello.", sampling={"max_tokens": 12, "temperature": 0})
        assert "done" in events[-1] and text_of(events)
        # Both replicas read the same conversation.
        for replica in range(2):
            channel, stub = session_stub(replicated, replica)
            with channel:
                listed = stub.ListMessages(session_pb2.ListMessagesRequest(session_id=sid), metadata=user.metadata)
            assert [m.content for m in listed.messages] == ["Say hello.", text_of(events)]


def test_one_turn_per_session_across_replicas_and_a_killed_replicas_turn(replicated: Stack, user: Caller) -> None:
    with httpx.Client(base_url=replicated.url, timeout=60) as http:
        sid = create_session(http, user)["id"]
        channel_a, a = session_stub(replicated, 0)
        channel_b, b = session_stub(replicated, 1)
        with channel_a, channel_b:
            running = b.Chat(session_pb2.ChatRequest(session_id=sid, content="Write a long poem.", sampling=ENDLESS),
                             metadata=user.metadata)
            received = ""
            for event in running:
                received += event.delta.text
                if len(received) > 20:
                    break
            # Replica a and the gateway (whichever replica it picks) refuse a second turn.
            with pytest.raises(grpc.RpcError) as caught:
                next(iter(a.Chat(session_pb2.ChatRequest(session_id=sid, content="Me too."), metadata=user.metadata)))
            assert caught.value.code() == grpc.StatusCode.ABORTED
            refused = http.post(f"/v1/sessions/{sid}:chat", json={"content": "Me too."}, headers=user.headers)
            assert refused.status_code == 409, refused.text
            # A checkpoint of what streamed (every 0.2 s here; a loaded machine takes longer).
            deadline = time.monotonic() + 15
            while not ((last := messages(http, user, sid)[-1])["role"] == "MESSAGE_ROLE_ASSISTANT" and last["content"]):
                assert time.monotonic() < deadline, "no checkpoint of the answer within 15 s"
                time.sleep(0.1)
            killed = replicated.replicas("session")[1]
            killed.popen.kill()
            killed.popen.wait()
            killed_at = time.monotonic()
        # The partial answer is kept; replica a serves; the dead replica's lease runs out.
        answer = messages(http, user, sid)[-1]
        assert answer["status"] == "MESSAGE_STATUS_INCOMPLETE" and answer["content"]
        assert answer["content"].startswith(received) or received.startswith(answer["content"])
        while True:
            asked = time.monotonic()
            with http.stream("POST", f"/v1/sessions/{sid}:chat", headers=user.headers,
                             json={"content": "Go on.", "sampling": {"max_tokens": 8}}) as response:
                response.read()
            if response.status_code != 409:
                break
            assert time.monotonic() - killed_at < LEASE_SECONDS + 3, "the dead replica's lease did not expire"
            time.sleep(0.3)
        assert response.status_code == 200, response.text
        waited = asked - killed_at  # when the turn was accepted, not when its answer ended
        assert waited <= LEASE_SECONDS + 3
        print(f"turn free again {waited:.1f} s after the SIGKILL (lease {LEASE_SECONDS} s)")
    replicated.respawn("session-2")
    replicated.wait_healthy(timeout=60)


def test_failed_sign_ins_are_counted_across_auth_replicas(replicated: Stack) -> None:
    name = f"target-{uuid.uuid4().hex[:6]}"
    sign_in(replicated.url, name, PASSWORD, register=True)
    channels = [grpc.insecure_channel(f"127.0.0.1:{p.port}") for p in replicated.replicas("auth")]
    try:
        stubs = [auth_pb2_grpc.AuthServiceStub(c) for c in channels]
        for i in range(LOCKOUT_AFTER):  # alternating replicas, from different addresses
            with pytest.raises(grpc.RpcError) as caught:
                stubs[i % 2].Login(auth_pb2.LoginRequest(username=name, password="Wrong-password-9"),
                                   metadata=(("x-forwarded-for", f"198.51.100.{i}"),))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for c in channels:
            c.close()
    with httpx.Client(base_url=replicated.url, timeout=30) as http:
        for _ in range(2):  # whichever replica answers
            locked = http.post("/v1/auth/login", json={"username": name, "password": PASSWORD})
            assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1


def test_concurrent_refreshes_on_both_replicas_get_one_new_token(replicated: Stack) -> None:
    with httpx.Client(base_url=replicated.url, timeout=30) as http:
        answer = http.post("/v1/auth/register", json={"username": f"ref-{uuid.uuid4().hex[:6]}", "password": PASSWORD})
        refresh_token = answer.json()["tokens"]["refresh_token"]

        def refresh(_: int) -> httpx.Response:
            return http.post("/v1/auth/refresh", json={"refresh_token": refresh_token})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(refresh, range(6)))
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        successors = {a.json()["tokens"]["refresh_token"] for a in answers}
        assert len(successors) == 1  # the sign-in lives on, whichever replica answered
        assert http.post("/v1/auth/refresh", json={"refresh_token": successors.pop()}).status_code == 200


def test_an_api_key_revoked_on_one_replica_is_refused_everywhere(replicated: Stack, user: Caller) -> None:
    with httpx.Client(base_url=replicated.url, timeout=30) as http:
        created = http.post("/v1/api-keys", json={"name": "soon revoked"}, headers=user.headers).json()
        key = {"authorization": f"Bearer {created['secret']}"}
        assert http.get("/v1/sessions", headers=key).status_code == 200
        channels = [grpc.insecure_channel(f"127.0.0.1:{p.port}") for p in replicated.replicas("auth")]
        try:
            stubs = [auth_pb2_grpc.CredentialServiceStub(c) for c in channels]
            revoke = auth_pb2_grpc.AuthServiceStub(channels[0])
            revoke.DeleteApiKey(auth_pb2.DeleteApiKeyRequest(id=created["api_key"]["id"]), metadata=user.metadata)
            for stub in stubs:  # at once, on both auth replicas
                with pytest.raises(grpc.RpcError) as caught:
                    stub.VerifyApiKey(auth_pb2.VerifyApiKeyRequest(secret=created["secret"]))
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            for c in channels:
                c.close()
        time.sleep(1.2)  # other services trust a verified key for PARLEY_API_KEY_CACHE_SECONDS (1 s here)
        assert http.get("/v1/sessions", headers=key).status_code == 401


def test_a_budget_and_the_ledger_hold_across_replicas(replicated: Stack, user: Caller) -> None:
    """Tokens used through session replica a refuse a turn through replica b once an admin's daily
    budget is reached; both cache replicas report the same use (Redis counters, PostgreSQL ledger)."""
    admin = sign_in(replicated.url, "admin", ADMIN_PASSWORD)
    someone = sign_in(replicated.url, f"budget-{uuid.uuid4().hex[:6]}", PASSWORD, register=True)
    with httpx.Client(base_url=replicated.url, timeout=60) as http:
        first, second = create_session(http, someone)["id"], create_session(http, someone)["id"]
        whose = http.get("/v1/users/me", headers=someone.headers).json()["id"]
        channel_a, a = session_stub(replicated, 0)
        channel_b, b = session_stub(replicated, 1)
        with channel_a, channel_b:
            short = inference_pb2.SamplingParams(max_tokens=8)
            events = list(a.Chat(session_pb2.ChatRequest(session_id=first, content="Hi!", sampling=short),
                                 metadata=someone.metadata))
            used = events[-1].done.usage.total_tokens
            assert used > 0
            time.sleep(1.5)  # recorded after the answer; the ledger flushes every second
            caches = [grpc.insecure_channel(f"127.0.0.1:{p.port}") for p in replicated.replicas("cache")]
            try:
                for channel in caches:
                    stub = cache_pb2_grpc.CacheServiceStub(channel)
                    limits = stub.GetRateLimit(cache_pb2.GetRateLimitRequest(user_id="me"), metadata=someone.metadata)
                    assert [u.used for u in limits.budgets] == [used, used]
                    usage = stub.GetUsage(cache_pb2.GetUsageRequest(group_by=["model"]), metadata=someone.metadata)
                    (result,) = usage.data[-1].results
                    assert (result.num_model_requests, result.input_tokens + result.output_tokens) == (1, used)
            finally:
                for channel in caches:
                    channel.close()
            assert http.patch(f"/v1/rate-limits/{whose}", json={"tokens_per_day": used},
                              headers=admin.headers).status_code == 200
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(b.Chat(session_pb2.ChatRequest(session_id=second, content="More?"),
                                 metadata=someone.metadata)))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(refused.value.trailing_metadata())["parley-reason"] == "insufficient_quota"
        assert messages(http, someone, second) == []


def test_a_database_outage_is_503_with_retry_after_then_service_resumes(
        replicated: Stack, user: Caller, postgres: PostgresServer) -> None:
    with httpx.Client(base_url=replicated.url, timeout=30) as http:
        postgres.stop()
        try:
            started = time.monotonic()
            down = http.get("/v1/sessions", headers=user.headers)
            assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1, down.text
            # The store's error, or the identity check's when the replica has no JWKS yet.
            assert "unavailable" in down.json()["message"] or "unreachable" in down.json()["message"]
            assert time.monotonic() - started < 6
        finally:
            postgres.start()
        deadline = time.monotonic() + 20
        while (status := http.get("/v1/sessions", headers=user.headers).status_code) != 200:
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.3)
        back = time.monotonic() - started
        print(f"service back {back:.1f} s after the outage began")
