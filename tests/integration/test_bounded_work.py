"""Bounded work per request (issue 20): a request too large for its model is refused before
anything renders it, on every path that renders a chat — in milliseconds, through Envoy, and with a
message that names the limit. (100,000 tiny messages on :countTokens took 300 s and held a core.)"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from services.stack import Stack
from tests.integration.conftest import Caller, new_user

MODEL = "smollm2-135m-instruct"
TINY = {"role": "user", "content": "a" * 12}


def post(base_url: str, user: Caller, path: str, body: dict, tries: int = 3) -> tuple[httpx.Response, float]:
    """The answer and the fastest of `tries` identical requests: the bound is the server's, and one try
    that a busy 2-core machine descheduled says nothing about it. Every try must answer the same."""
    data = json.dumps(body).encode()
    answers, times = [], []
    with httpx.Client(base_url=base_url, timeout=60) as http:
        http.get("/healthz")  # the connection is open before the clock starts
        for _ in range(tries):
            started = time.perf_counter()
            answers.append(http.post(path, content=data, headers={**user.headers, "content-type": "application/json"}))
            times.append(time.perf_counter() - started)
    assert len({(a.status_code, a.text) for a in answers}) == 1, [a.text for a in answers]
    return answers[-1], min(times)


def message_of(answer: httpx.Response) -> str:
    body = answer.json()
    return body["error"]["message"] if "error" in body else body["message"]


@pytest.fixture(scope="module")
def user(stack: Stack, admin: Caller) -> Caller:
    """A user of its own, with room in its rate limit: these tests send each request three times, which
    would use up the shared user's 60 a minute for the modules after this one."""
    caller = new_user(stack.url, "bounded")
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        me = http.get("/v1/users/me", headers=caller.headers).json()
        raised = http.patch(f"/v1/rate-limits/{me['id']}", headers=admin.headers, json={"requests_per_minute": 1000})
        assert raised.status_code == 200, raised.text
    return caller


@pytest.fixture(scope="module")
def session_id(stack: Stack, user: Caller) -> str:
    return httpx.post(f"{stack.url}/v1/sessions", json={"title": "bounded"}, headers=user.headers).json()["id"]


PATHS = {
    "chat completions": ("/v1/chat/completions", lambda items: {"model": MODEL, "messages": items}),
    "legacy completions": ("/v1/completions", lambda items: {"model": MODEL, "prompt": [m["content"] for m in items]}),
    "responses": ("/v1/responses", lambda items: {"model": MODEL, "input": items}),
    "countTokens": (f"/v1/models/{MODEL}:countTokens", lambda items: {"messages": items}),
    "generate": (f"/v1/models/{MODEL}:generate", lambda items: {"messages": items}),
}


@pytest.mark.parametrize("name", [*PATHS, "session chat"])
def test_a_hundred_thousand_messages_are_refused_in_under_100_ms(base_url: str, user: Caller, session_id: str,
                                                                 name: str) -> None:
    if name == "session chat":
        path, body = f"/v1/sessions/{session_id}:chat", {"content": "hi", "tool_results": [
            {"tool_call_id": "call_1", "content": "a"}] * 100_000}
    else:
        path, shape = PATHS[name]
        body = shape([TINY] * 100_000)
    answer, took = post(base_url, user, path, body)
    assert answer.status_code == 413, answer.text
    assert "PARLEY_MAX_REQUEST_BYTES" in message_of(answer)
    assert took < 0.1, f"{name}: {took * 1000:.0f} ms"


@pytest.mark.parametrize("name", ["countTokens", "generate", "chat completions"])
def test_too_many_messages_within_the_body_limit_are_refused_before_rendering(base_url: str, user: Caller,
                                                                              name: str) -> None:
    path, shape = PATHS[name]
    answer, took = post(base_url, user, path, shape([{"role": "user"}] * 50_000))  # ~850 KB
    assert answer.status_code == 400, answer.text
    assert "at most 4096 messages, got 50000" in message_of(answer)
    assert took < 1.0, f"{name}: {took * 1000:.0f} ms"


@pytest.mark.parametrize("name", ["countTokens", "generate", "chat completions", "legacy completions"])
def test_more_characters_than_the_model_can_take_are_refused_before_tokenizing(base_url: str, user: Caller,
                                                                               name: str) -> None:
    """The shared stack's model has a 2,048-token window: at most 16,384 characters (8 a token)."""
    path, shape = PATHS[name]
    answer, took = post(base_url, user, path, shape([{"role": "user", "content": "a" * 900_000}]))
    assert answer.status_code == 400, answer.text
    assert "the request holds 900000 characters; at most 16384 are accepted" in message_of(answer)
    assert took < 0.3, f"{name}: {took * 1000:.0f} ms"


def test_a_session_turn_too_long_is_refused_before_anything_is_stored(base_url: str, user: Caller,
                                                                      session_id: str) -> None:
    answer, took = post(base_url, user, f"/v1/sessions/{session_id}:chat", {"content": "a" * 900_000})
    assert answer.status_code == 400, answer.text
    assert "900000 characters" in message_of(answer)
    assert took < 0.3, f"{took * 1000:.0f} ms"
    messages = httpx.get(f"{base_url}/v1/sessions/{session_id}/messages", headers=user.headers).json()
    assert messages.get("messages", []) == []
