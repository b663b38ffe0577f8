"""The cache through Envoy, on its own stack backed by a real valkey-server: deterministic
/v1/chat/completions served from cache (header, speed, stream and non-stream), stats and flush with
their guards, rate limits as 429 with Retry-After, Redis killed mid-run and restarted, and the
inference service carrying on with the cache service itself gone."""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from services.stack import Stack
from tests.integration.conftest import ADMIN_PASSWORD, Caller, new_user, sign_in, start_stack
from tests.redis_server import RedisServer

MODEL = "smollm2-135m-instruct"
KEY_REQUESTS_PER_MINUTE = 3


@pytest.fixture(scope="module")
def cache_stack(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Stack]:
    running = start_stack(
        tmp_path_factory.mktemp("cache-stack"), PARLEY_REDIS_URL=redis.url, PARLEY_CACHE_REDIS_RETRY_SECONDS="0.5",
        PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE="600",
        PARLEY_RATE_LIMIT_API_KEY_REQUESTS_PER_MINUTE=str(KEY_REQUESTS_PER_MINUTE),
        PARLEY_PARALLEL_SLOTS="2", PARLEY_CONTEXT_LENGTH="2048",
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def admin(cache_stack: Stack) -> Caller:
    return sign_in(cache_stack.url, "admin", ADMIN_PASSWORD)


@pytest.fixture(scope="module")
def user(cache_stack: Stack) -> Caller:
    return new_user(cache_stack.url)


@pytest.fixture
def http(cache_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cache_stack.url, timeout=60) as client:
        yield client


def chat(http: httpx.Client, caller: Caller, content: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 48,
            "temperature": 0, **extra}
    return http.post("/v1/chat/completions", json=body, headers=caller.headers)


def stats(http: httpx.Client, caller: Caller) -> dict:
    answer = http.get("/v1/cache/stats", headers=caller.headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_deterministic_completion_is_served_from_cache_the_second_time(http: httpx.Client, user: Caller) -> None:
    prompt = f"Describe a lighthouse in two sentences. ({uuid.uuid4().hex[:6]})"
    started = time.perf_counter()
    first = chat(http, user, prompt)
    generation_s = time.perf_counter() - started
    assert first.status_code == 200, first.text
    assert first.headers["x-parley-cache"] == "miss"
    second = chat(http, user, prompt)
    assert second.status_code == 200 and second.headers["x-parley-cache"] == "hit"
    a, b = first.json(), second.json()
    assert b["choices"][0]["message"] == a["choices"][0]["message"]
    assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
    assert b["id"] != a["id"] and b["object"] == "chat.completion" and b["model"] == MODEL
    assert b["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == b["usage"]["prompt_tokens"]

    hits = []
    for _ in range(20):
        started = time.perf_counter()
        answer = chat(http, user, prompt)
        hits.append(time.perf_counter() - started)
        assert answer.headers["x-parley-cache"] == "hit"
    p50 = statistics.median(hits)
    print(f"\ncache p50 hit latency through Envoy: {p50 * 1000:.1f} ms over {len(hits)} requests; "
          f"generation of the same answer ({a['usage']['completion_tokens']} tokens): {generation_s * 1000:.0f} ms; "
          f"ratio {generation_s / p50:.0f}x")
    assert p50 * 5 < generation_s


def test_a_streamed_hit_is_the_same_openai_sse(cache_stack: Stack, http: httpx.Client, user: Caller) -> None:
    prompt = f"Name three rivers. ({uuid.uuid4().hex[:6]})"
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "seed": 11,
            "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
    texts, events = [], []
    for expected in ("miss", "hit"):
        with http.stream("POST", "/v1/chat/completions", json=body, headers=user.headers) as response:
            assert response.status_code == 200
            assert response.headers["x-parley-cache"] == expected
            assert response.headers["content-type"].startswith("text/event-stream")
            data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]))
        events.append(chunks)
    assert texts[0] == texts[1] and texts[0]
    assert events[1][-1]["choices"] == [] and events[1][-1]["usage"]["completion_tokens"] > 0
    assert [c["choices"][0]["finish_reason"] for c in events[1] if c["choices"]][-1] in ("stop", "length")
    # The official SDK reads a streamed hit like any other stream.
    client = openai.OpenAI(base_url=f"{cache_stack.url}/v1", api_key=user.token, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=32, seed=11, temperature=0.8,
        stream=True)
    assert raw.headers["x-parley-cache"] == "hit"
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == texts[0]


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}


def test_every_parameter_that_changes_the_answer_is_in_the_key(http: httpx.Client, user: Caller) -> None:
    prompt = f"Weather in Oslo, please. ({uuid.uuid4().hex[:6]})"
    base = {"max_tokens": 6}
    assert chat(http, user, prompt, **base).headers["x-parley-cache"] == "miss"
    assert chat(http, user, prompt, **base).headers["x-parley-cache"] == "hit"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    variants = [
        {"top_p": 0.5}, {"top_k": 5}, {"min_p": 0.2}, {"repetition_penalty": 1.3}, {"presence_penalty": 1.0},
        {"frequency_penalty": 1.0}, {"logit_bias": {"11": -5}}, {"seed": 5}, {"max_tokens": 7}, {"stop": ["zz"]},
        {"tools": [WEATHER_TOOL]}, {"tools": [WEATHER_TOOL], "tool_choice": "none"},
        {"tools": [WEATHER_TOOL, CLOCK_TOOL]}, {"tools": [WEATHER_TOOL], "parallel_tool_calls": False},
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}}},
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}]},
    ]
    for variant in variants:
        answer = chat(http, user, prompt, **{**base, **variant})
        assert answer.status_code == 200, (variant, answer.text)
        assert answer.headers["x-parley-cache"] == "miss", variant
    # A tool call comes back from the cache as a call, under a new id.
    forced = {**base, "max_tokens": 40, "tools": [CLOCK_TOOL], "tool_choice": "required", "parallel_tool_calls": False}
    first = chat(http, user, prompt, **forced).json()["choices"][0]
    again = chat(http, user, prompt, **forced)
    assert again.headers["x-parley-cache"] == "hit"
    second = again.json()["choices"][0]
    assert first["finish_reason"] == second["finish_reason"] == "tool_calls"
    assert [c["function"] for c in second["message"]["tool_calls"]] == [c["function"] for c in first["message"]["tool_calls"]]
    assert second["message"]["tool_calls"][0]["id"] != first["message"]["tool_calls"][0]["id"]


def test_only_deterministic_requests_are_cached(http: httpx.Client, user: Caller) -> None:
    prompt = f"Say something. ({uuid.uuid4().hex[:6]})"
    for _ in range(2):
        answer = http.post("/v1/chat/completions", headers=user.headers, json={
            "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0.9})
        assert answer.status_code == 200 and answer.headers["x-parley-cache"] == "miss"


def test_stats_for_every_user_and_flush_for_admins_only(http: httpx.Client, user: Caller, admin: Caller) -> None:
    assert chat(http, user, "Hello there, cache.").status_code == 200
    assert chat(http, user, "Hello there, cache.").headers["x-parley-cache"] == "hit"
    seen = stats(http, user)
    assert seen["backend"] == "redis" and seen["degraded"] is False
    assert int(seen["hits"]) >= 1 and int(seen["entries"]) >= 1 and int(seen["bytes"]) > 0
    assert 0 < seen["hit_ratio"] <= 1

    denied = http.post("/v1/cache:flush", json={}, headers=user.headers)
    assert denied.status_code == 403
    assert http.post("/v1/cache:flush", json={}).status_code == 401
    flushed = http.post("/v1/cache:flush", json={}, headers=admin.headers)
    assert flushed.status_code == 200 and int(flushed.json()["removed"]) >= 1
    assert int(stats(http, user)["entries"]) == 0
    assert chat(http, user, "Hello there, cache.").headers["x-parley-cache"] == "miss"


def test_rate_limits_answer_429_with_retry_after(cache_stack: Stack, http: httpx.Client, admin: Caller) -> None:
    # Per API key, from configuration (PARLEY_RATE_LIMIT_API_KEY_REQUESTS_PER_MINUTE=3), via the SDK.
    someone = new_user(cache_stack.url)
    client = openai.OpenAI(base_url=f"{cache_stack.url}/v1", api_key=someone.api_key, max_retries=0)
    for _ in range(KEY_REQUESTS_PER_MINUTE):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 120
    assert "per minute" in refused.value.body["message"]  # OpenAI's {"error": {...}} shape, parsed by the SDK
    raw = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {someone.api_key}"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                          "stream": True})
    assert raw.status_code == 429 and int(raw.headers["retry-after"]) >= 1 and "error" in raw.json()
    assert chat(http, someone, "Hi", max_tokens=1).status_code == 200  # the account itself is still under its limit

    # Per user, from an admin's override.
    me = http.get("/v1/users/me", headers=someone.headers).json()
    user_id = me["id"]
    path = f"/v1/rate-limits/{user_id}"
    assert http.patch(path, json={"requests_per_minute": 1}, headers=someone.headers).status_code == 403
    updated = http.patch(path, json={"requests_per_minute": 1}, headers=admin.headers)
    assert updated.status_code == 200 and updated.json()["overridden"] is True
    own = http.get("/v1/rate-limits/me", headers=someone.headers).json()
    assert (own["user_id"], own["requests_per_minute"], own["overridden"]) == (user_id, 1, True)
    assert http.get(f"/v1/rate-limits/{uuid.uuid4()}", headers=someone.headers).status_code == 403
    over = chat(http, someone, "Hi", max_tokens=1)
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    assert "your account" in over.json()["error"]["message"]
    back = http.patch(path, json={"requests_per_minute": -1}, headers=admin.headers)
    assert back.json()["overridden"] is False and back.json()["requests_per_minute"] == 600


def test_redis_killed_mid_run_never_fails_a_chat(cache_stack: Stack, redis: RedisServer, http: httpx.Client,
                                                 user: Caller) -> None:
    prompt = f"Tell me about owls. ({uuid.uuid4().hex[:6]})"
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40,
            "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=user.headers) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        redis.kill()  # mid-stream
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"

    for content in (prompt, "And about cats?"):
        for _ in range(2):
            answer = chat(http, user, content)
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
            assert answer.headers["x-parley-cache"] == "miss"
    down = stats(http, user)
    assert down["degraded"] is True and down["last_error"]
    assert http.get("/healthz").status_code == 200  # a degraded cache is not an unhealthy service

    redis.start()  # empty, on the same port
    deadline = time.monotonic() + 10
    while stats(http, user)["degraded"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats(http, user)["degraded"] is False
    assert chat(http, user, prompt).headers["x-parley-cache"] == "miss"
    time.sleep(0.2)  # the store runs after the answer has gone out
    assert chat(http, user, prompt).headers["x-parley-cache"] == "hit"


def test_inference_carries_on_without_the_cache_service(cache_stack: Stack, http: httpx.Client,
                                                        user: Caller) -> None:
    """Last in this module: it kills the stack's cache process."""
    cache = next(p for p in cache_stack.processes if p.name == "cache")
    cache.popen.kill()
    cache.popen.wait()
    for stream in (False, True):
        started = time.perf_counter()
        answer = chat(http, user, "Is anyone there?", max_tokens=8, stream=stream)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-parley-cache"] == "miss"
        assert time.perf_counter() - started < 10
        if stream:
            assert answer.text.rstrip().endswith("data: [DONE]")
        else:
            assert answer.json()["choices"][0]["message"]["content"]
