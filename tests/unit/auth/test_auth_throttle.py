"""Login throttling: slow-down, then lockout, per username and per client address."""

from __future__ import annotations

import time

import grpc
import pytest
from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth import app as auth_app
from services.auth.store import AuthStore
from services.auth.throttle import LoginThrottle
from services.core.config import CommonSettings
from services.core.errors import ResourceExhausted
from services.core.identity import IdentitySettings
from services.core.server import start_server
from tests.unit.auth.auth_testing import FAST, PASSWORD, settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_slowdown_grows_then_lockout_then_release(store: AuthStore) -> None:
    clock = Clock()
    throttle = LoginThrottle(settings(login_slowdown_seconds=0.5, login_slowdown_max_seconds=1.5), store, clock)
    delays = []
    for _ in range(FAST.login_lockout_after):
        attempt = throttle.attempt("alice", "10.0.0.1")
        delays.append(attempt.delay)
        throttle.failed(attempt)
    assert delays == [0, 0, 0, 0.5, 1.0]  # slow-down after 3 failures, doubling
    with pytest.raises(ResourceExhausted) as caught:
        throttle.attempt("alice", "10.0.0.2")  # another address does not help
    assert caught.value.retry_after == pytest.approx(FAST.login_lockout_seconds)
    clock.now += FAST.login_lockout_seconds - 10
    with pytest.raises(ResourceExhausted) as caught:
        throttle.attempt("alice", "10.0.0.2")
    assert caught.value.retry_after == pytest.approx(10)
    clock.now += 11
    # Unlocked: one more attempt, slow (its failures are still inside the window), locks again.
    assert throttle.attempt("alice", "10.0.0.2").delay == 1.5
    with pytest.raises(ResourceExhausted):
        throttle.attempt("alice", "10.0.0.2")
    clock.now += FAST.login_failure_window_seconds
    assert throttle.attempt("alice", "10.0.0.2").delay == 0  # the window has passed


def test_success_clears_the_username_counter(store: AuthStore) -> None:
    throttle = LoginThrottle(FAST, store, Clock())
    for _ in range(FAST.login_lockout_after - 1):
        throttle.failed(throttle.attempt("alice", "10.0.0.1"))
    throttle.succeeded(throttle.attempt("alice", "10.0.0.1"))  # the last attempt before a lockout, right
    for _ in range(FAST.login_lockout_after - 1):
        throttle.failed(throttle.attempt("alice", "10.0.0.1"))
    throttle.attempt("alice", "10.0.0.1")


def test_one_address_spraying_many_usernames_is_locked_out(store: AuthStore) -> None:
    throttle = LoginThrottle(FAST, store, Clock())
    for i in range(FAST.login_address_lockout_after):
        throttle.failed(throttle.attempt(f"user{i}", "10.0.0.9"))
    with pytest.raises(ResourceExhausted):
        throttle.attempt("fresh-name", "10.0.0.9")
    throttle.attempt("fresh-name", "10.0.0.10")


def test_attempts_are_counted_before_the_password_is_checked(store: AuthStore) -> None:
    """Attempts still being checked count: a guesser who sends many at once gets no more than one
    who waits for each answer, and a right password is not counted."""
    throttle = LoginThrottle(FAST, store, Clock())
    pending = [throttle.attempt("alice", f"10.0.0.{i}") for i in range(FAST.login_lockout_after)]
    with pytest.raises(ResourceExhausted):
        throttle.attempt("alice", "10.0.1.1")
    throttle.succeeded(pending[-1])  # the attempt that started the lockout was right: it ends
    throttle.attempt("alice", "10.0.1.1")


async def test_grpc_lockout_uses_forwarded_address_and_sends_retry_after(tmp_path) -> None:
    spec = await auth_app.build(CommonSettings(data_dir=tmp_path), FAST, IdentitySettings())
    server = await start_server(spec, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await stub.Register(auth_pb2.RegisterRequest(username="alice", password=PASSWORD))
            # Spray from one forwarded address: wrong passwords for many names.
            sprayer = (("x-forwarded-for", "203.0.113.7"),)
            for i in range(FAST.login_address_lockout_after):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Login(auth_pb2.LoginRequest(username=f"name{i}", password="Wrong-pass-1"),
                                     metadata=sprayer)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD), metadata=sprayer)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(caught.value.trailing_metadata() or ())
            assert 1 <= int(trailers["retry-after"]) <= FAST.login_lockout_seconds
            # alice, from her own address, still gets in.
            started = time.monotonic()
            ok = await stub.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD),
                                  metadata=(("x-forwarded-for", "198.51.100.1"),))
            assert ok.user.username == "alice" and time.monotonic() - started < 1
    finally:
        await server.stop(0)


def test_sign_ins_in_flight_from_one_address_do_not_slow_each_other_down(store: AuthStore) -> None:
    """Colleagues behind one NAT signing in at once: attempts still being checked count towards a
    lockout, not towards the slow-down, which only failures earn."""
    throttle = LoginThrottle(FAST, store, Clock())
    pending = [throttle.attempt(f"user{i}", "10.0.0.9") for i in range(FAST.login_address_lockout_after - 1)]
    assert [a.delay for a in pending] == [0] * len(pending)
    for attempt in pending:
        throttle.succeeded(attempt)
    assert throttle.attempt("user0", "10.0.0.9").delay == 0
