"""GET /v1/sessions/{id}:connect: a real WebSocket client (the `websockets` package) through Envoy to
the session service's bridge and the real model — several turns on one socket, stop mid-answer,
ownership, credentials and a foreign Origin as close codes, queue positions (also on the SSE :chat stream) while
other streams run, and a vanished client's generation freed at once."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.stack import Stack
from tests.integration.chat import create_session, iter_events, messages
from tests.integration.conftest import Caller, new_user, sign_in, start_stack

MODEL = "smollm2-135m-instruct"
SHORT = {"temperature": 0, "max_tokens": 8}
LONG = {"temperature": 0.9, "max_tokens": 1500}


@pytest.fixture(scope="module")
def ws_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two slots and room to queue, so that 8 other streams leave a turn waiting in line."""
    running = start_stack(tmp_path_factory.mktemp("websocket"), PARLEY_PARALLEL_SLOTS="2", PARLEY_QUEUE_DEPTH="16",
                          PARLEY_CONTEXT_LENGTH="2048", PARLEY_WEBSOCKET_AUTH_SECONDS="1",
                          PARLEY_WEBSOCKET_IDLE_SECONDS="4", PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE="0",
                          PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE="0")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def caller(ws_stack: Stack) -> Caller:
    return new_user(ws_stack.url, "ws")


@pytest.fixture(scope="module")
def http(ws_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ws_stack.url, timeout=120) as client:
        yield client


def ws_url(stack: Stack, session_id: str) -> str:
    return f"ws://127.0.0.1:{stack.gateway.http_port}/v1/sessions/{session_id}:connect"


async def receive(ws: ClientConnection, timeout: float = 60) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def turn(ws: ClientConnection, content: str, sampling: dict[str, Any] = SHORT) -> list[dict[str, Any]]:
    """One turn's events, up to its done or error."""
    await ws.send(json.dumps({"type": "chat", "content": content, "sampling": sampling}))
    events = []
    while True:
        events.append(await receive(ws))
        if events[-1]["type"] in ("done", "error"):
            return events


async def close_code(ws: ClientConnection, timeout: float = 10) -> int | None:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def test_several_turns_on_one_socket_are_stored(ws_stack: Stack, caller: Caller, http: httpx.Client) -> None:
    sid = create_session(http, caller, model=MODEL)["id"]
    async with connect(ws_url(ws_stack, sid), additional_headers=caller.headers) as ws:
        assert await receive(ws) == {"type": "ready", "session_id": sid}
        await ws.send('{"type": "ping"}')
        assert await receive(ws) == {"type": "pong"}
        answers = []
        for question in ("What is the capital of France?", "And of Italy?"):
            events = await turn(ws, question)
            kinds = [e["type"] for e in events]
            assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"delta"}, kinds
            assert events[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
            answers.append((events[0]["assistant_message_id"], "".join(e["text"] for e in events if e["type"] == "delta")))
        # A message that is not a chat, stop or ping is an error event; the socket stays open.
        await ws.send('{"type": "dance"}')
        assert (await receive(ws))["code"] == "INVALID_ARGUMENT"
        await ws.send(json.dumps({"type": "chat", "content": ""}))
        assert (await receive(ws))["code"] == "INVALID_ARGUMENT"
    stored = messages(http, caller, sid)
    assert [m["role"] for m in stored] == ["MESSAGE_ROLE_USER", "MESSAGE_ROLE_ASSISTANT"] * 2
    assert [(m["id"], m["content"]) for m in stored[1::2]] == answers
    assert all(m["status"] == "MESSAGE_STATUS_COMPLETE" for m in stored)


async def test_stop_mid_answer_keeps_the_partial_answer(ws_stack: Stack, caller: Caller, http: httpx.Client) -> None:
    sid = create_session(http, caller, model=MODEL)["id"]
    async with connect(ws_url(ws_stack, sid), additional_headers=caller.headers) as ws:
        await receive(ws)  # ready
        await ws.send(json.dumps({"type": "chat", "content": "Tell me a very long story.", "sampling": LONG}))
        received = []
        while len(received) < 5:
            event = await receive(ws)
            assert event["type"] in ("start", "delta", "queued"), event
            received += [event["text"]] if event["type"] == "delta" else []
        # A second turn while one runs is refused in-band, as :chat's 409.
        await ws.send(json.dumps({"type": "chat", "content": "Wait!"}))
        await ws.send('{"type": "stop"}')
        rest = []
        while not rest or rest[-1]["type"] != "done":
            rest.append(await receive(ws))
        assert any(e["type"] == "error" and e["code"] == "ABORTED" for e in rest), rest
        assert rest[-1]["finish_reason"] == "FINISH_REASON_CANCELLED"
        received += [e["text"] for e in rest if e["type"] == "delta"]
        # The session is free again at once: the next turn on the same socket runs.
        assert (await turn(ws, "Short answer please."))[-1]["type"] == "done"
    answer = messages(http, caller, sid)[1]
    assert answer["status"] == "MESSAGE_STATUS_INCOMPLETE"
    assert answer["content"] and answer["content"].startswith("".join(received))
    assert len(answer["content"]) < 1500


async def test_another_users_session_closes_with_4404(ws_stack: Stack, caller: Caller, http: httpx.Client) -> None:
    other = sign_in(ws_stack.url, f"other-{uuid.uuid4().hex[:8]}", "Another-long-passphrase-9", register=True)
    theirs = create_session(http, other)["id"]
    async with connect(ws_url(ws_stack, theirs), additional_headers=caller.headers) as ws:
        assert await close_code(ws) == 4404
    async with connect(ws_url(ws_stack, "no-such-session"), additional_headers=caller.headers) as ws:
        assert await close_code(ws) == 4404
    assert messages(http, other, theirs) == []


async def test_a_foreign_origin_closes_with_4403_and_the_gateways_own_origin_is_served(
        ws_stack: Stack, caller: Caller, http: httpx.Client) -> None:
    """A page elsewhere cannot open a socket (a browser would bring the user's credential); the page
    the gateway serves can: its Origin matches the Host that Envoy passes on to the bridge."""
    sid = create_session(http, caller)["id"]
    own = f"http://127.0.0.1:{ws_stack.gateway.http_port}"
    for origin in ("https://evil.example", f"http://localhost:{ws_stack.gateway.http_port}"):
        async with connect(ws_url(ws_stack, sid), origin=origin, additional_headers=caller.headers) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 10)
                raise AssertionError(f"{origin}: the socket was served")
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 4403, closed
                assert origin in closed.rcvd.reason
    async with connect(ws_url(ws_stack, sid), origin=own, additional_headers=caller.headers) as ws:
        assert await receive(ws) == {"type": "ready", "session_id": sid}


@pytest.mark.parametrize("how", ["header", "message", "nothing", "not-json"])
async def test_bad_or_missing_credentials_close_with_4401(ws_stack: Stack, caller: Caller, http: httpx.Client,
                                                         how: str) -> None:
    sid = create_session(http, caller)["id"]
    headers = {"authorization": "Bearer not-a-valid-token"} if how == "header" else {}
    started = time.monotonic()
    async with connect(ws_url(ws_stack, sid), additional_headers=headers) as ws:
        if how == "message":
            await ws.send(json.dumps({"type": "auth", "token": "not-a-valid-token"}))
        elif how == "not-json":
            await ws.send("hello")
        assert await close_code(ws) == 4401
    # Silence is closed after PARLEY_WEBSOCKET_AUTH_SECONDS (1 s here), not left open.
    assert time.monotonic() - started < 5


async def test_a_socket_outliving_its_credential_closes_with_4401_before_the_next_turn(
        ws_stack: Stack, caller: Caller, http: httpx.Client) -> None:
    sid = create_session(http, caller, model=MODEL)["id"]
    created = http.post("/v1/api-keys", json={"name": "short-lived"}, headers=caller.headers).json()
    async with connect(ws_url(ws_stack, sid)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": created["secret"]}))
        assert (await receive(ws))["type"] == "ready"
        assert (await turn(ws, "Hi!"))[-1]["type"] == "done"
        assert http.delete(f"/v1/api-keys/{created['api_key']['id']}", headers=caller.headers).status_code == 200
        await asyncio.sleep(1.5)  # the test stack trusts a verified key for 1 s (PARLEY_API_KEY_CACHE_SECONDS)
        await ws.send(json.dumps({"type": "chat", "content": "And again?", "sampling": SHORT}))
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 4401, closed
            assert "revoked" in closed.rcvd.reason
    # The refused turn stored nothing.
    assert [m["content"] for m in messages(http, caller, sid) if m["role"] == "MESSAGE_ROLE_USER"] == ["Hi!"]


async def test_browser_style_auth_message_then_idle_close(ws_stack: Stack, caller: Caller, http: httpx.Client) -> None:
    sid = create_session(http, caller, model=MODEL)["id"]
    async with connect(ws_url(ws_stack, sid)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": caller.api_key}))
        assert await receive(ws) == {"type": "ready", "session_id": sid}
        assert (await turn(ws, "Hi!"))[-1]["type"] == "done"
        started = time.monotonic()
        assert await close_code(ws, timeout=30) == 4408  # PARLEY_WEBSOCKET_IDLE_SECONDS=4
        assert 3 < time.monotonic() - started < 15


def _stream_openai(base_url: str, caller: Caller, started: threading.Event, results: list[int]) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": 16, "temperature": 0.9,
            "messages": [{"role": "user", "content": "Tell me a story about a dragon."}]}
    with httpx.Client(base_url=base_url, timeout=120, headers=caller.headers) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            started.set()
            results.append(response.status_code)
            for _ in response.iter_lines():
                pass


async def test_queue_position_is_reported_while_8_other_streams_run(ws_stack: Stack, caller: Caller,
                                                                     http: httpx.Client) -> None:
    sid = create_session(http, caller, model=MODEL)["id"]
    sse_sid = create_session(http, caller, model=MODEL)["id"]
    results: list[int] = []
    signals = [threading.Event() for _ in range(8)]
    others = [threading.Thread(target=_stream_openai, args=(ws_stack.url, caller, s, results)) for s in signals]
    for thread in others:
        thread.start()
    for signal in signals:
        assert await asyncio.to_thread(signal.wait, 60)
    async with connect(ws_url(ws_stack, sid), additional_headers=caller.headers) as ws:
        await receive(ws)  # ready
        # 2 slots, 8 streams: 6 wait. This turn waits behind them, and so does an SSE turn.
        sse_first: list[dict[str, Any]] = []

        def sse_turn() -> None:
            with http.stream("POST", f"/v1/sessions/{sse_sid}:chat", json={"content": "Hi", "sampling": SHORT},
                             headers=caller.headers) as response:
                sse_first.extend(list(iter_events(response)))

        sse = threading.Thread(target=sse_turn)
        sse.start()
        events = await turn(ws, "Hello there", SHORT)
        await asyncio.to_thread(sse.join, 120)
        for thread in others:
            await asyncio.to_thread(thread.join, 120)
    assert results == [200] * 8
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and "start" in kinds and kinds[-1] == "done", events
    queued = [e for e in events if e["type"] == "queued"]
    assert kinds.index("start") == len(queued)  # every queued event comes before start
    positions = [e["position"] for e in queued]
    assert positions[0] >= 2 and positions == sorted(positions, reverse=True), positions
    assert all(e["estimated_wait_ms"] > 0 for e in queued)
    # The SSE stream says the same before its start.
    assert "queued" in sse_first[0] and sse_first[0]["queued"]["position"] >= 1, sse_first[:2]
    assert any("start" in e for e in sse_first) and "done" in sse_first[-1]


async def test_a_vanished_client_frees_its_generation_at_once(ws_stack: Stack, caller: Caller,
                                                             http: httpx.Client) -> None:
    """Both slots busy with endless answers, both clients vanish (no close frame): a turn right after
    starts without waiting in line."""

    async def abandon() -> None:
        sid = create_session(http, caller, model=MODEL)["id"]
        ws = await connect(ws_url(ws_stack, sid), additional_headers=caller.headers)
        await receive(ws)
        await ws.send(json.dumps({"type": "chat", "content": "Tell me a very long story.", "sampling": LONG}))
        while (await receive(ws))["type"] != "delta":
            pass
        ws.transport.abort()  # the TCP connection drops, as when a phone loses its network

    await asyncio.gather(abandon(), abandon())
    await asyncio.sleep(0.1)
    sid = create_session(http, caller, model=MODEL)["id"]
    with http.stream("POST", f"/v1/sessions/{sid}:chat", json={"content": "Hi", "sampling": SHORT},
                     headers=caller.headers) as response:
        first = next(iter_events(response))
    assert "start" in first, first
