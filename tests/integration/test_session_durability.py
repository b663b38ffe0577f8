"""What survives: a SIGKILLed session service under write load, an inference crash mid-answer (on a
conversation's stream and on the OpenAI-compatible ones), and a restart of the whole stack. Nothing
acknowledged to a client may be lost."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.stack import Stack
from tests.integration.chat import chat, create_session, iter_events, messages, text_of
from tests.integration.conftest import Caller, sign_in, stack_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data_dir: Path = tmp_path_factory.mktemp("durable")
    return stack_env(data_dir, PARLEY_PARALLEL_SLOTS="2", PARLEY_CONTEXT_LENGTH="1024",
                     PARLEY_CHECKPOINT_SECONDS="0.2")


@pytest.fixture(scope="module")
def durable(env: dict[str, str]) -> Iterator[Stack]:
    stack = Stack(env=env, log_dir=Path(env["PARLEY_DATA_DIR"]) / "logs")
    stack.start()
    try:
        stack.wait_healthy(timeout=180)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def owner(durable: Stack) -> Caller:
    return sign_in(durable.url, f"durable-{uuid.uuid4().hex[:6]}", "Durable-passphrase-77", register=True)


def kill(stack: Stack, name: str) -> None:
    process = next(p for p in stack.processes if p.name == name)
    process.popen.kill()
    process.popen.wait()


def restart(stack: Stack, name: str) -> None:
    stack.respawn(name)
    stack.wait_healthy(timeout=180)


def test_sigkill_during_write_load_loses_nothing_acknowledged(durable: Stack, owner: Caller) -> None:
    created: list[str] = []              # 200 answered
    acked_users: dict[str, str] = {}     # user message id -> content (start event received)
    acked_answers: dict[str, str] = {}   # assistant message id -> text (done event received)
    started_answers: list[str] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        with httpx.Client(base_url=durable.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    answer = http.post("/v1/sessions", json={"title": f"w{n}"}, headers=owner.headers)
                    if answer.status_code != 200:
                        continue
                    sid = answer.json()["id"]
                    created.append(sid)
                    content = f"writer {n} says {uuid.uuid4().hex[:8]}"
                    with http.stream("POST", f"/v1/sessions/{sid}:chat", headers=owner.headers,
                                     json={"content": content, "sampling": {"max_tokens": 3}}) as response:
                        text, ids = "", None
                        for event in iter_events(response):
                            if "start" in event:
                                ids = event["start"]
                                acked_users[ids["user_message_id"]] = content
                                started_answers.append(ids["assistant_message_id"])
                            elif "delta" in event:
                                text += event["delta"]["text"]
                            elif "done" in event and ids:
                                acked_answers[ids["assistant_message_id"]] = text
                except httpx.HTTPError:
                    time.sleep(0.05)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked_answers) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    kill(durable, "session")
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acked_answers) >= 6, "the load never got going"

    restart(durable, "session")
    with httpx.Client(base_url=durable.url, timeout=30) as http:
        stored: dict[str, dict] = {}
        listed = set()
        token = ""
        while True:
            page = http.get("/v1/sessions", params={"page_size": 200, "page_token": token}, headers=owner.headers).json()
            listed |= {s["id"] for s in page["sessions"]}
            token = page["next_page_token"]
            if not token:
                break
        for sid in created:
            stored.update({m["id"]: m for m in messages(http, owner, sid)})
    assert set(created) <= listed
    for message_id, content in acked_users.items():
        assert stored[message_id]["content"] == content
    for message_id, text in acked_answers.items():
        assert stored[message_id]["status"] == "MESSAGE_STATUS_COMPLETE" and stored[message_id]["content"] == text
    # Answers cut by the kill are there too, marked incomplete rather than lost.
    for message_id in started_answers:
        assert message_id in stored
        assert stored[message_id]["status"] in ("MESSAGE_STATUS_COMPLETE", "MESSAGE_STATUS_INCOMPLETE")


def test_partial_answer_is_checkpointed_while_it_streams(durable: Stack, owner: Caller) -> None:
    """SIGKILL of session mid-answer: the text saved by the last checkpoint (every 0.2 s here) remains."""
    with httpx.Client(base_url=durable.url, timeout=60) as http:
        sid = create_session(http, owner)["id"]
        received, first_text = "", 0.0
        began = time.monotonic()
        try:
            with http.stream("POST", f"/v1/sessions/{sid}:chat", headers=owner.headers,
                             json={"content": "Write a long poem about autumn.",
                                   # The end-of-turn tokens are banned: an answer that ended before
                                   # the kill (it happened once) would leave nothing to test.
                                   "sampling": {"max_tokens": 400, "temperature": 0.8,
                                                "logit_bias": {"0": -100, "2": -100}}}) as response:
                for event in iter_events(response):
                    received += event.get("delta", {}).get("text", "")
                    if received and not first_text:
                        first_text = time.monotonic()
                    # Text has streamed for a while (several checkpoints), however slow its start.
                    if received and time.monotonic() > max(began + 1.5, first_text + 1.0):
                        kill(durable, "session")
        except httpx.HTTPError:
            pass  # the stream breaks with the process
    restart(durable, "session")
    with httpx.Client(base_url=durable.url, timeout=60) as http:
        answer = messages(http, owner, sid)[-1]
    assert answer["status"] == "MESSAGE_STATUS_INCOMPLETE"
    assert answer["content"] and received.startswith(answer["content"])


def test_inference_crash_mid_answer_is_an_error_event_and_keeps_the_partial_text(durable: Stack, owner: Caller) -> None:
    with httpx.Client(base_url=durable.url, timeout=60) as http:
        sid = create_session(http, owner)["id"]
        events = []
        with http.stream("POST", f"/v1/sessions/{sid}:chat", headers=owner.headers,
                         json={"content": "Tell a very long story about the sea.",
                               "sampling": {"max_tokens": 400, "temperature": 0.8}}) as response:
            for event in iter_events(response):
                events.append(event)
                if sum("delta" in e for e in events) == 5:
                    kill(durable, "inference")
        assert "start" in events[0] and "error" in events[-1], events[-3:]
        assert events[-1]["error"]["code"] in ("UNAVAILABLE", "CANCELLED", "INTERNAL")
        answer = messages(http, owner, sid)[-1]
        assert answer["status"] == "MESSAGE_STATUS_ERROR" and answer["error"]
        assert answer["content"] == text_of(events) and answer["content"]
        # While inference is down a new turn fails cleanly (503) and stores nothing.
        refused = http.post(f"/v1/sessions/{sid}:chat", json={"content": "Still there?"}, headers=owner.headers)
        assert refused.status_code == 503, refused.text
        assert len(messages(http, owner, sid)) == 2
    restart(durable, "inference")
    # Session's channel reconnects by itself within its short backoff (services/core/channels.py).
    with httpx.Client(base_url=durable.url, timeout=60) as http:
        deadline = time.monotonic() + 5
        while (answer := http.post(f"/v1/sessions/{sid}:chat", json={"content": "Are you back?",
                                   "sampling": {"max_tokens": 4}}, headers=owner.headers)).status_code == 503:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.status_code == 200 and '"done"' in answer.text, answer.text


def test_an_openai_stream_cut_by_an_inference_crash_is_an_error_not_a_short_answer(durable: Stack,
                                                                                  owner: Caller) -> None:
    """Chat completions stream from inference itself, through Envoy: when inference dies nobody is
    left to write an error event, so Envoy must not end the response cleanly — it closes the
    connection without the last chunk, and the SDK raises. The Responses API is served by session,
    which outlives inference: its stream ends with response.failed."""
    client = openai.OpenAI(base_url=f"{durable.url}/v1", api_key=owner.api_key, max_retries=0, timeout=60)
    story = [{"role": "user", "content": "Write a long story about a dog."}]
    received: list[object] = []
    stream = client.chat.completions.create(model="smollm2-135m-instruct", stream=True, max_tokens=400,
                                            temperature=0.8, messages=story)
    with pytest.raises(openai.APIConnectionError) as raised:
        for chunk in stream:
            received.append(chunk)
            if len(received) == 5:
                kill(durable, "inference")
    # The transport's own words (httpx's RemoteProtocolError): the body ended before its last chunk.
    assert "incomplete chunked read" in str(raised.value.__cause__), repr(raised.value.__cause__)
    assert all(c.choices[0].finish_reason is None for c in received if c.choices), received[-1]
    restart(durable, "inference")

    events = []
    with client.responses.create(model="smollm2-135m-instruct", stream=True, max_output_tokens=400,
                                 input="Write a long story about a dog.") as responses:
        for event in responses:
            events.append(event)
            if len(events) == 6:
                kill(durable, "inference")
    assert events[-1].type == "response.failed" and events[-1].response.error.message, events[-1]
    restart(durable, "inference")


def test_a_conversations_kv_state_survives_an_inference_restart(durable: Stack, env: dict[str, str],
                                                                owner: Caller) -> None:
    """Inference stopped (SIGTERM: its warm conversations go to <data dir>/kv) and started again: the
    next turn of a conversation evaluates only its last prompt token, and answers as the engine did
    before it stopped (greedy)."""
    client = openai.OpenAI(base_url=f"{durable.url}/v1", api_key=owner.api_key, max_retries=0, timeout=60)
    chat = [{"role": "system", "content": "You answer in one short sentence."}]
    for question in ("What is a river?", "Where does one start?", "And where does it end?", "Name a long one."):
        chat.append({"role": "user", "content": question})
        answer = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=24, temperature=0,
                                                messages=chat)
        chat.append({"role": "assistant", "content": answer.choices[0].message.content})
    inference = next(p for p in durable.processes if p.name == "inference")
    inference.popen.terminate()
    assert inference.popen.wait(timeout=30) == 0
    assert list((Path(env["PARLEY_DATA_DIR"]) / "kv").glob("*.kv"))
    restart(durable, "inference")

    # The last turn again; top_p (meaningless at temperature 0) keeps the response cache out of it.
    again = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=24, temperature=0, top_p=0.5,
                                           messages=chat[:-1])
    assert again.usage.prompt_tokens == answer.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1  # from disk
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_history_survives_a_restart_of_the_whole_stack(durable: Stack, env: dict[str, str], owner: Caller) -> None:
    with httpx.Client(base_url=durable.url, timeout=60) as http:
        sid = create_session(http, owner, system_prompt="Be terse.")["id"]
        chat(http, owner, sid, "Remember the number 42.", sampling={"max_tokens": 8})
        before = messages(http, owner, sid)
        session_before = http.get(f"/v1/sessions/{sid}", headers=owner.headers).json()
    durable.stop()
    again = Stack(env=env, log_dir=Path(env["PARLEY_DATA_DIR"]) / "logs-restarted")
    again.start()
    try:
        again.wait_healthy(timeout=180)
        # Signing keys persist too, so the same token still works after the restart.
        with httpx.Client(base_url=again.url, timeout=60) as http:
            assert http.get(f"/v1/sessions/{sid}", headers=owner.headers).json() == session_before
            assert messages(http, owner, sid) == before
            assert "done" in chat(http, owner, sid, "Which number?", sampling={"max_tokens": 8})[-1]
            assert len(messages(http, owner, sid)) == 4
    finally:
        again.stop()
