"""Saved conversations through Envoy REST with the real bundled model: CRUD, paging, ownership, and
the streaming chat turn (SSE start/delta/done/error, persistence, 409, disconnects, the cache, tool
calls and their results)."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.chat import chat, create_session, iter_events, messages, text_of
from tests.integration.conftest import Caller, sign_in

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def stranger(stack) -> Caller:
    return sign_in(stack.url, f"stranger-{uuid.uuid4().hex[:8]}", "Another-long-passphrase-9", register=True)


def test_create_get_update_delete(http: httpx.Client, user: Caller) -> None:
    created = create_session(http, user, title="Trip plans", system_prompt="Be brief.", model=MODEL,
                             sampling={"temperature": 0.3, "max_tokens": 64})
    sid = created["id"]
    assert created["title"] == "Trip plans" and created["sampling"]["temperature"] == pytest.approx(0.3)
    assert created["create_time"] and created["update_time"]
    assert http.get(f"/v1/sessions/{sid}", headers=user.headers).json() == created

    # With a mask only the named fields change; an empty field in the mask clears it.
    patched = http.patch(f"/v1/sessions/{sid}", params={"update_mask": "title,system_prompt"},
                         json={"title": "Holiday", "system_prompt": ""}, headers=user.headers)
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert (body["title"], body["system_prompt"], body["model"]) == ("Holiday", "", MODEL)
    # Without a mask, every non-empty field is applied; sampling fields merge.
    patched = http.patch(f"/v1/sessions/{sid}", json={"sampling": {"top_k": 5}}, headers=user.headers).json()
    assert patched["title"] == "Holiday" and patched["sampling"]["top_k"] == 5
    assert patched["sampling"]["max_tokens"] == 64

    assert http.delete(f"/v1/sessions/{sid}", headers=user.headers).status_code == 200
    assert http.get(f"/v1/sessions/{sid}", headers=user.headers).status_code == 404
    assert http.get(f"/v1/sessions/{sid}/messages", headers=user.headers).status_code == 404
    assert http.delete(f"/v1/sessions/{sid}", headers=user.headers).status_code == 404


@pytest.mark.parametrize("fields, words", [
    ({"sampling": {"temperature": 7}}, "temperature"),
    ({"model": "no-such-model"}, "unknown model"),
    ({"title": "x" * 201}, "title"),
])
def test_bad_session_fields_are_400(http: httpx.Client, user: Caller, fields: dict, words: str) -> None:
    answer = http.post("/v1/sessions", json=fields, headers=user.headers)
    assert answer.status_code == 400 and words in answer.json()["message"], answer.text


def test_bad_update_mask_and_page_token_are_400(http: httpx.Client, user: Caller) -> None:
    sid = create_session(http, user)["id"]
    answer = http.patch(f"/v1/sessions/{sid}", params={"update_mask": "create_time"}, json={}, headers=user.headers)
    assert answer.status_code == 400 and "create_time" in answer.json()["message"]
    answer = http.get("/v1/sessions", params={"page_token": "garbage"}, headers=user.headers)
    assert answer.status_code == 400 and "page_token" in answer.json()["message"]


def test_list_is_newest_first_and_pages(http: httpx.Client, base_url: str) -> None:
    owner = sign_in(base_url, f"pager-{uuid.uuid4().hex[:8]}", "Paging-passphrase-123", register=True)
    ids = [create_session(http, owner, title=f"s{i}")["id"] for i in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = http.get("/v1/sessions", params={"page_size": 2, "page_token": token}, headers=owner.headers).json()
        assert len(page["sessions"]) <= 2
        seen += [s["id"] for s in page["sessions"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == ids[::-1]


def test_another_users_session_is_not_found_everywhere(http: httpx.Client, user: Caller, stranger: Caller) -> None:
    sid = create_session(http, user, title="Private")["id"]
    chat(http, user, sid, "Say hello.", sampling={"max_tokens": 4})
    before = messages(http, user, sid)
    missing = uuid.uuid4().hex
    for target in (sid, missing):
        answers = [
            http.get(f"/v1/sessions/{target}", headers=stranger.headers),
            http.patch(f"/v1/sessions/{target}", json={"title": "mine"}, headers=stranger.headers),
            http.delete(f"/v1/sessions/{target}", headers=stranger.headers),
            http.get(f"/v1/sessions/{target}/messages", headers=stranger.headers),
            http.post(f"/v1/sessions/{target}:chat", json={"content": "hi"}, headers=stranger.headers),
        ]
        assert [a.status_code for a in answers] == [404] * 5
        # The same words for someone else's session as for one that does not exist.
        assert {a.json()["message"].replace(target, "ID") for a in answers} == {"session 'ID' not found"}
    assert sid not in [s["id"] for s in http.get("/v1/sessions", headers=stranger.headers).json()["sessions"]]
    assert http.get(f"/v1/sessions/{sid}", headers=user.headers).json()["title"] == "Private"
    assert messages(http, user, sid) == before


def test_chat_streams_and_stores_the_turn(http: httpx.Client, user: Caller) -> None:
    sid = create_session(http, user)["id"]
    events = chat(http, user, sid, "What is the capital of France?\nAnswer in one word.", sampling={"max_tokens": 24})
    assert "start" in events[0] and "done" in events[-1]
    deltas = [e for e in events if "delta" in e]
    assert len(deltas) >= 2 and len(events) == len(deltas) + 2
    start, done = events[0]["start"], events[-1]["done"]
    assert start["model"] == MODEL
    assert done["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH") and done["cached"] is False
    assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0

    stored = messages(http, user, sid)
    assert [(m["id"], m["role"], m["status"]) for m in stored] == [
        (start["user_message_id"], "MESSAGE_ROLE_USER", "MESSAGE_STATUS_COMPLETE"),
        (start["assistant_message_id"], "MESSAGE_ROLE_ASSISTANT", "MESSAGE_STATUS_COMPLETE")]
    assert stored[1]["content"] == text_of(events)
    assert stored[1]["completion_tokens"] == done["usage"]["completion_tokens"]
    session = http.get(f"/v1/sessions/{sid}", headers=user.headers).json()
    assert session["title"] == "What is the capital of France?"
    # Activity moves the session to the top of the list.
    create_session(http, user)
    chat(http, user, sid, "Thanks!", sampling={"max_tokens": 4})
    assert http.get("/v1/sessions", headers=user.headers).json()["sessions"][0]["id"] == sid


def test_the_model_sees_the_history_and_system_prompt(http: httpx.Client, user: Caller) -> None:
    sid = create_session(http, user, system_prompt="You are a helpful assistant.")["id"]
    chat(http, user, sid, "My name is Zorblax. Remember it.", sampling={"max_tokens": 16, "temperature": 0})
    events = chat(http, user, sid, "What is my name?", sampling={"max_tokens": 16, "temperature": 0})
    assert "Zorblax" in text_of(events)
    # ...and the prompt grew by the first turn.
    first, second = (m for m in messages(http, user, sid) if m["role"] == "MESSAGE_ROLE_ASSISTANT")
    assert second["prompt_tokens"] > first["prompt_tokens"] + 10


def test_long_history_is_trimmed_to_the_context_window(http: httpx.Client, user: Caller) -> None:
    # The shared stack has a 2048-token context; ~700 tokens per turn overflow it within a few turns.
    sid = create_session(http, user, system_prompt="Answer with one word.")["id"]
    filler = "apple banana cherry " * 230
    dropped = []
    for i in range(4):
        events = chat(http, user, sid, f"Turn {i}: {filler}", sampling={"max_tokens": 4, "temperature": 0})
        assert "done" in events[-1], events[-1]
        # Everything sent fits: the prompt plus the answer room stays inside the window.
        assert events[-1]["done"]["usage"]["prompt_tokens"] <= 2048 - 4
        dropped.append(events[0]["start"]["dropped_messages"])
    # Whole turns (a question and its answer) went, oldest first; all of them stay stored.
    assert dropped[0] == 0 and dropped[-1] > 0 and all(d % 2 == 0 for d in dropped)
    assert len(messages(http, user, sid)) == 8


def test_message_too_long_for_the_context_is_400_and_stores_nothing(http: httpx.Client, user: Caller) -> None:
    sid = create_session(http, user)["id"]
    answer = http.post(f"/v1/sessions/{sid}:chat", json={"content": "word " * 3000}, headers=user.headers)
    assert answer.status_code == 400, answer.text
    words = answer.json()["message"]  # both counts: what the message needs, what the window leaves
    assert "needs" in words and "tokens" in words and "only 1536 of" in words, words
    assert messages(http, user, sid) == []


@pytest.mark.parametrize("body, status", [
    ({"content": "   "}, 400),
    ({"content": "hi", "sampling": {"temperature": -1}}, 400),
    ({"content": "hi", "model": "no-such-model"}, 404),
])
def test_bad_chat_requests_store_nothing(http: httpx.Client, user: Caller, body: dict, status: int) -> None:
    sid = create_session(http, user)["id"]
    answer = http.post(f"/v1/sessions/{sid}:chat", json=body, headers=user.headers)
    assert answer.status_code == status, answer.text
    assert messages(http, user, sid) == []


def test_second_chat_on_a_busy_session_is_409(http: httpx.Client, base_url: str, user: Caller) -> None:
    sid = create_session(http, user)["id"]
    started = threading.Event()
    results: list[list[dict]] = []

    def long_turn() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as own, own.stream(
                "POST", f"/v1/sessions/{sid}:chat", headers=user.headers,
                json={"content": "Write a long story about a dragon.", "sampling": {"max_tokens": 200, "temperature": 0.8}}
        ) as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    started.set()
            results.append(events)

    worker = threading.Thread(target=long_turn)
    worker.start()
    assert started.wait(60)
    answer = http.post(f"/v1/sessions/{sid}:chat", json={"content": "Interrupting!"}, headers=user.headers)
    worker.join(120)
    assert answer.status_code == 409, answer.text
    assert "already" in answer.json()["message"]
    stored = messages(http, user, sid)
    assert [m["content"] for m in stored if m["role"] == "MESSAGE_ROLE_USER"] == ["Write a long story about a dragon."]
    # Once the first turn is over, the session takes turns again.
    assert "done" in chat(http, user, sid, "Thanks.", sampling={"max_tokens": 2})[-1]


def test_client_disconnect_keeps_the_partial_answer_as_incomplete(http: httpx.Client, base_url: str, user: Caller) -> None:
    sid = create_session(http, user)["id"]
    received = ""
    with httpx.Client(base_url=base_url, timeout=120) as own, own.stream(
            "POST", f"/v1/sessions/{sid}:chat", headers=user.headers,
            json={"content": "Write a long story about a castle.", "sampling": {"max_tokens": 300}}) as response:
        for event in iter_events(response):
            if "delta" in event:
                received += event["delta"]["text"]
                if len(received) > 20:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while True:
        answer = messages(http, user, sid)[-1]
        if answer["status"] == "MESSAGE_STATUS_INCOMPLETE" and answer["content"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer["status"] == "MESSAGE_STATUS_INCOMPLETE"
    assert answer["content"].startswith(received) and len(answer["content"]) < 2000
    # The session is free again at once.
    assert "done" in chat(http, user, sid, "Shorter, please.", sampling={"max_tokens": 2})[-1]


def test_streams_closed_at_random_points_keep_every_delivered_character(http: httpx.Client, base_url: str,
                                                                         user: Caller) -> None:
    """Issue 20: a client that leaves at any point (before the first word, mid-answer, between two
    events) finds all it received stored, and the answer marked incomplete."""
    rng = random.Random(20)
    cuts = [0, *(rng.randint(1, 40) for _ in range(5))]  # deltas received before the client leaves
    received: dict[str, str] = {}
    for cut in cuts:
        sid = create_session(http, user)["id"]
        received[sid] = ""
        with httpx.Client(base_url=base_url, timeout=120) as own, own.stream(
                "POST", f"/v1/sessions/{sid}:chat", headers=user.headers,
                json={"content": f"Tell a long story about ship {cut}.", "sampling": {"max_tokens": 400}}) as response:
            deltas = 0
            for event in iter_events(response):
                if deltas >= cut and ("delta" in event or "start" in event):
                    break
                if "delta" in event:
                    received[sid] += event["delta"]["text"]
                    deltas += 1
    for sid, text in received.items():
        deadline = time.monotonic() + 30
        while True:
            answer = messages(http, user, sid)[-1]
            saved = answer["role"] == "MESSAGE_ROLE_ASSISTANT" and answer["status"] == "MESSAGE_STATUS_INCOMPLETE"
            if saved and answer["content"].startswith(text) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answer["role"] == "MESSAGE_ROLE_ASSISTANT" and answer["status"] == "MESSAGE_STATUS_INCOMPLETE", answer
        assert answer["content"].startswith(text), (text, answer["content"])


def test_deterministic_turn_is_served_from_cache_the_second_time(http: httpx.Client, user: Caller) -> None:
    question = f"Name a fruit. ({uuid.uuid4().hex[:6]})"
    sampling = {"temperature": 0, "max_tokens": 12}
    first_sid, second_sid = create_session(http, user)["id"], create_session(http, user)["id"]
    first = chat(http, user, first_sid, question, sampling=sampling)
    second = chat(http, user, second_sid, question, sampling=sampling)
    assert first[-1]["done"]["cached"] is False and second[-1]["done"]["cached"] is True
    assert text_of(second) == text_of(first)
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    hit, miss = second[-1]["done"]["usage"], first[-1]["done"]["usage"]
    assert [hit[k] for k in counts] == [miss[k] for k in counts]
    assert hit["cached_prompt_tokens"] == hit["prompt_tokens"]  # a replayed prompt counts as cached
    assert messages(http, user, second_sid)[-1]["content"] == text_of(first)
    # Sampled (non-deterministic) turns are never served from cache.
    third = chat(http, user, create_session(http, user)["id"], question, sampling={"temperature": 0.9, "max_tokens": 12})
    assert third[-1]["done"]["cached"] is False


WEATHER = {
    "tools": [{"name": "get_weather", "description": "The current weather in a city.", "parameters": json.dumps(
        {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]})}],
    "toolChoice": "function", "toolChoiceFunction": "get_weather", "parallelToolCalls": False,
}


def test_tool_calls_are_streamed_stored_and_answered(http: httpx.Client, user: Caller, stranger: Caller) -> None:
    sid = create_session(http, user)["id"]
    events = chat(http, user, sid, "What is the weather in Oslo right now?", structured=WEATHER,
                  sampling={"temperature": 0, "max_tokens": 64})
    calls = [c for e in events if "delta" in e for c in e["delta"]["tool_calls"]]
    assert [c["name"] for c in calls] == ["get_weather"], events
    assert calls[0]["id"].startswith("call_") and isinstance(json.loads(calls[0]["arguments"])["city"], str)
    assert events[-1]["done"]["finish_reason"] == "FINISH_REASON_TOOL_CALLS"
    asked = messages(http, user, sid)[-1]
    assert (asked["role"], asked["status"], asked["tool_calls"]) == (
        "MESSAGE_ROLE_ASSISTANT", "MESSAGE_STATUS_COMPLETE", calls)

    # Wrong answers are 400s naming the id, and store nothing; someone else's session stays 404.
    before = messages(http, user, sid)
    for results in ([{"toolCallId": "call_unknown", "content": "12 C"}],
                    [{"toolCallId": calls[0]["id"], "content": "12 C"}, {"toolCallId": "call_unknown", "content": ""}]):
        answer = http.post(f"/v1/sessions/{sid}:chat", json={"toolResults": results}, headers=user.headers)
        assert answer.status_code == 400 and "call_unknown" in answer.json()["message"], answer.text
    answer = http.post(f"/v1/sessions/{sid}:chat", json={"toolResults": [{"toolCallId": calls[0]["id"], "content": "x"}]},
                       headers=stranger.headers)
    assert answer.status_code == 404, answer.text
    assert messages(http, user, sid) == before

    # The next turn answers the call, with no user message.
    result = json.dumps({"temperature_c": 12, "sky": "cloudy"})
    events = chat(http, user, sid, "", toolResults=[{"toolCallId": calls[0]["id"], "content": result}],
                  sampling={"temperature": 0, "max_tokens": 32})
    start, done = events[0]["start"], events[-1]["done"]
    assert start["user_message_id"] == "" and len(start["tool_message_ids"]) == 1
    assert done["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH") and text_of(events)
    stored = messages(http, user, sid)
    assert [(m["role"], m["tool_call_id"]) for m in stored] == [
        ("MESSAGE_ROLE_USER", ""), ("MESSAGE_ROLE_ASSISTANT", ""), ("MESSAGE_ROLE_TOOL", calls[0]["id"]),
        ("MESSAGE_ROLE_ASSISTANT", "")]
    assert (stored[2]["id"], stored[2]["content"]) == (start["tool_message_ids"][0], result)
    assert (stored[3]["id"], stored[3]["content"]) == (start["assistant_message_id"], text_of(events))
    # The answer's prompt held the call and its result: more than the question alone.
    alone = chat(http, user, create_session(http, user)["id"], "What is the weather in Oslo right now?",
                 sampling={"temperature": 0, "max_tokens": 1})
    assert stored[3]["prompt_tokens"] > alone[-1]["done"]["usage"]["prompt_tokens"] + 15
    # An answered call cannot be answered again.
    answer = http.post(f"/v1/sessions/{sid}:chat", json={"toolResults": [{"toolCallId": calls[0]["id"], "content": "x"}]},
                       headers=user.headers)
    assert answer.status_code == 400 and calls[0]["id"] in answer.json()["message"], answer.text
