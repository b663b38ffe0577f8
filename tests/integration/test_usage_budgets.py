"""Token budgets and the usage ledger through Envoy, on a stack with a real valkey-server: a budget
an admin sets refuses the next chat completion (429, insufficient_quota, Retry-After until midnight
UTC) and the next session turn, over SSE and WebSocket (nothing stored), GET /v1/rate-limits/me shows the use, GET
/v1/usage gives OpenAI's usage shape grouped by model with 404 for another user's, and the ledger
survives a SIGKILL of the cache service and Redis losing its counters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from services.stack import Stack
from tests.integration.chat import chat, create_session, messages
from tests.integration.conftest import ADMIN_PASSWORD, Caller, new_user, sign_in, start_stack
from tests.redis_server import RedisServer

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("budget-stack"), PARLEY_REDIS_URL=redis.url,
                          PARLEY_CACHE_REDIS_RETRY_SECONDS="0.2", PARLEY_CONTEXT_LENGTH="2048",
                          PARLEY_RATE_LIMIT_TOKENS_PER_MONTH="1000000")
    yield running
    running.stop()


@pytest.fixture
def http(budget_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=budget_stack.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def admin(budget_stack: Stack) -> Caller:
    return sign_in(budget_stack.url, "admin", ADMIN_PASSWORD)


def complete(http: httpx.Client, caller: Caller, content: str, **extra: object) -> httpx.Response:
    return http.post("/v1/chat/completions", headers=caller.headers, json={
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra})


def user_id(http: httpx.Client, caller: Caller) -> str:
    return http.get("/v1/users/me", headers=caller.headers).json()["id"]


def budgets(http: httpx.Client, caller: Caller, expected_day: int, timeout: float = 5.0) -> dict[str, dict]:
    """GET /v1/rate-limits/me's budgets by period, once the day's use is `expected_day` (tokens
    are recorded just after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = http.get("/v1/rate-limits/me", headers=caller.headers)
        assert answer.status_code == 200, answer.text
        found = {b["period"]: b for b in answer.json()["budgets"]}
        if found["day"]["used"] == expected_day or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def seconds_to_midnight_utc() -> float:
    now = datetime.now(UTC)
    return (datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1) - now).total_seconds()


async def websocket_turn(stack: Stack, caller: Caller, session_id: str) -> dict[str, str]:
    """A turn on the session's WebSocket: its refusal's type, code and reason."""
    url = f"ws://127.0.0.1:{stack.gateway.http_port}/v1/sessions/{session_id}:connect"
    async with connect(url, additional_headers=caller.headers) as ws:
        await ws.send(json.dumps({"type": "chat", "content": "Hello?"}))
        event = {"type": "ready"}
        while event["type"] in ("ready", "queued"):
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert event.get("retry_after_seconds", 0) >= 1 and "tokens per day" in event.get("message", ""), event
    return {k: event.get(k) for k in ("type", "code", "reason")}


def test_a_budget_set_by_an_admin_refuses_the_next_request(budget_stack: Stack, http: httpx.Client,
                                                           admin: Caller) -> None:
    someone = new_user(budget_stack.url)
    first = complete(http, someone, "Name a colour.")
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    seen = budgets(http, someone, used)
    assert (seen["day"]["used"], seen["day"]["limit"]) == (used, 0)  # no daily budget: unlimited
    month = seen["month"]
    assert (month["used"], month["limit"], month["remaining"]) == (used, 1000000, 1000000 - used)
    assert seen["day"]["reset_time"].endswith("T00:00:00Z")

    path = f"/v1/rate-limits/{user_id(http, someone)}"
    assert http.patch(path, json={"tokens_per_day": used}, headers=someone.headers).status_code == 403
    updated = http.patch(path, json={"tokens_per_day": used}, headers=admin.headers)
    assert updated.status_code == 200 and updated.json()["tokens_per_day"] == used

    refused = complete(http, someone, "Name another colour.")
    assert refused.status_code == 429
    assert abs(int(refused.headers["retry-after"]) - seconds_to_midnight_utc()) < 10
    error = refused.json()["error"]
    assert error["code"] == error["type"] == "insufficient_quota"
    assert f"{used} tokens per day" in error["message"]
    client = openai.OpenAI(base_url=f"{budget_stack.url}/v1", api_key=someone.api_key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:  # the SDK sees OpenAI's own refusal
        client.embeddings.create(model="smollm2-135m-instruct", input="hello")
    assert raised.value.code == "insufficient_quota"

    session = create_session(http, someone, title="Over budget")["id"]
    with pytest.raises(AssertionError, match="^429: .*tokens per day"):
        chat(http, someone, session, "Hello?")
    assert asyncio.run(websocket_turn(budget_stack, someone, session)) == {
        "type": "error", "code": "RESOURCE_EXHAUSTED", "reason": "insufficient_quota"}
    assert messages(http, someone, session) == []  # nothing stored for the refused turns

    assert http.patch(path, json={"tokens_per_day": 0}, headers=admin.headers).json()["tokens_per_day"] == 0
    assert complete(http, someone, "And now?").status_code == 200  # unlimited again


def test_usage_is_reported_per_day_and_model(budget_stack: Stack, http: httpx.Client, admin: Caller) -> None:
    someone, other = new_user(budget_stack.url), new_user(budget_stack.url)
    answers = [complete(http, someone, f"Count to {n}.").json()["usage"] for n in (2, 3)]
    session = create_session(http, someone, title="Metered")["id"]
    chat(http, someone, session, "Hi!", sampling={"max_tokens": 6})
    time.sleep(0.5)  # recorded just after the answers
    page = http.get("/v1/usage", params={"group_by": "model", "start_time": int(time.time()) - 3600},
                    headers=someone.headers)
    assert page.status_code == 200, page.text
    body = page.json()
    assert (body["object"], body["has_more"], body["next_page"]) == ("page", False, None)
    bucket = body["data"][-1]
    assert bucket["object"] == "bucket" and bucket["start_time"] <= time.time() < bucket["end_time"]
    (result,) = bucket["results"]
    assert result["object"] == "organization.usage.completions.result" and result["model"] == MODEL
    assert result["num_model_requests"] == 3
    assert result["input_tokens"] > sum(a["prompt_tokens"] for a in answers)  # and the session turn's
    assert result["output_tokens"] >= sum(a["completion_tokens"] for a in answers)

    whose = user_id(http, someone)
    assert http.get("/v1/usage", params={"user_id": whose}, headers=other.headers).status_code == 404
    assert http.get("/v1/usage", params={"user_id": "*"}, headers=other.headers).status_code == 404
    seen = http.get("/v1/usage", params={"user_id": whose, "group_by": "model"}, headers=admin.headers).json()
    assert seen["data"][-1]["results"] == bucket["results"]
    team = http.get("/v1/usage", params={"user_id": "*", "group_by": ["user_id", "model"]}, headers=admin.headers)
    assert whose in {r["user_id"] for r in team.json()["data"][-1]["results"]}
    assert http.get("/v1/usage", params={"bucket_width": "1h"}, headers=someone.headers).status_code == 400


def test_the_ledger_survives_a_sigkill_and_reseeds_budgets_redis_lost(budget_stack: Stack, redis: RedisServer,
                                                                       http: httpx.Client) -> None:
    """Last in this module: it kills the cache service and Redis."""
    someone = new_user(budget_stack.url)
    used = complete(http, someone, "Say yes.").json()["usage"]["total_tokens"]
    budgets(http, someone, used)
    time.sleep(1.5)  # past a flush of the ledger (PARLEY_USAGE_FLUSH_SECONDS=1)
    cache = next(p for p in budget_stack.processes if p.name == "cache")
    cache.popen.kill()
    cache.popen.wait()
    redis.kill()
    redis.start()  # empty: the day's and month's counters are gone
    budget_stack.respawn("cache")
    budget_stack.wait_healthy(timeout=60)
    page = http.get("/v1/usage", params={"group_by": "model"}, headers=someone.headers).json()
    (result,) = page["data"][-1]["results"]
    assert result["num_model_requests"] == 1 and result["input_tokens"] + result["output_tokens"] == used
    seen = budgets(http, someone, used)
    assert seen["day"]["used"] == seen["month"]["used"] == used  # re-seeded from the ledger
