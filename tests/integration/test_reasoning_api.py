"""A reasoning model's thinking apart from its answer, through Envoy with the real bundled model
given a template that opens a think block (conftest.THINKING_TEMPLATE): a session turn streams and
stores the reasoning apart from the content and never sends it back, the WebSocket carries it in its
own field, and the Responses API answers a `reasoning` item (the `openai` SDK reads it, plain,
streamed and retrieved), as do Anthropic's Messages API's `thinking` blocks. Thinking turned off
("none", thinking disabled) gives content and no reasoning."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from openai.types.responses import ResponseReasoningItem
from websockets.asyncio.client import connect

from services.stack import Stack
from tests.integration.chat import chat, create_session, messages, text_of
from tests.integration.conftest import THINKING_MODEL, Caller, new_user, start_thinking_stack

SHORT = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def think_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_thinking_stack(tmp_path_factory.mktemp("think-stack"), PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE="600")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def caller(think_stack: Stack) -> Caller:
    return new_user(think_stack.url, "thinker")


@pytest.fixture(scope="module")
def http(think_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=think_stack.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(think_stack: Stack, caller: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{think_stack.url}/v1", api_key=caller.api_key, max_retries=0, timeout=120)


def reasoning_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"].get("reasoning", "") for e in events if "delta" in e)


def prompt_tokens(http: httpx.Client, caller: Caller, chat_messages: list[dict[str, str]]) -> int:
    answer = http.post(f"/v1/models/{THINKING_MODEL}:countTokens", json={"messages": chat_messages},
                       headers=caller.headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["total_tokens"]


def test_a_turn_stores_its_reasoning_apart_and_never_sends_it_back(http: httpx.Client, caller: Caller) -> None:
    sid = create_session(http, caller)["id"]
    events = chat(http, caller, sid, "What is the capital of France?", sampling=SHORT)
    thought, said = reasoning_of(events), text_of(events)
    assert thought.strip(), events  # the prompt opened a think block the model never closes
    assert said == ""
    done = events[-1]["done"]
    assert 0 < done["usage"]["reasoning_tokens"] <= done["usage"]["completion_tokens"]

    answer = messages(http, caller, sid)[-1]
    assert answer["role"] == "MESSAGE_ROLE_ASSISTANT"
    assert answer["reasoning"] == thought and answer.get("content", "") == ""
    assert answer["reasoning_tokens"] == done["usage"]["reasoning_tokens"]

    # The next turn's prompt holds the questions only: exactly what countTokens makes of them, fewer
    # tokens than with the reasoning sent back as the answer.
    events = chat(http, caller, sid, "And of Italy?", sampling=SHORT)
    sent = events[-1]["done"]["usage"]["prompt_tokens"]
    questions = [{"role": "user", "content": "What is the capital of France?"}, {"role": "user", "content": "And of Italy?"}]
    assert sent == prompt_tokens(http, caller, questions)
    resent = [questions[0], {"role": "assistant", "content": thought}, questions[1]]
    assert sent < prompt_tokens(http, caller, resent)


def test_thinking_turned_off_answers_content_only(http: httpx.Client, caller: Caller) -> None:
    sid = create_session(http, caller)["id"]
    events = chat(http, caller, sid, "Say hello.", sampling=SHORT, structured={"reasoning_effort": "none"})
    assert reasoning_of(events) == "" and text_of(events).strip()
    answer = messages(http, caller, sid)[-1]
    assert answer.get("reasoning", "") == "" and answer["content"] == text_of(events)


def test_the_websocket_carries_reasoning_in_its_own_field(think_stack: Stack, http: httpx.Client,
                                                          caller: Caller) -> None:
    sid = create_session(http, caller)["id"]

    async def one_turn() -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{think_stack.gateway.http_port}/v1/sessions/{sid}:connect"
        async with connect(url, additional_headers=caller.headers) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "chat", "content": "Name a colour.", "sampling": SHORT}))
            events = []
            while not events or events[-1]["type"] not in ("done", "error"):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
            return events

    events = asyncio.run(one_turn())
    deltas = [e for e in events if e["type"] == "delta"]
    thought = "".join(d["reasoning"] for d in deltas)
    assert thought.strip() and "".join(d["text"] for d in deltas) == ""
    assert messages(http, caller, sid)[-1]["reasoning"] == thought


def test_responses_answer_a_reasoning_item(client: openai.OpenAI, http: httpx.Client, caller: Caller) -> None:
    first = client.responses.create(model=THINKING_MODEL, input="What is 2 + 2?", max_output_tokens=24, temperature=0)
    assert [item.type for item in first.output] == ["reasoning", "message"]
    thought = first.output[0]
    assert isinstance(thought, ResponseReasoningItem) and thought.id.startswith("rs_")
    assert thought.content and thought.content[0].type == "reasoning_text" and thought.content[0].text.strip()
    assert first.output_text == "" and thought.content[0].text not in ("", first.output_text)
    assert first.usage is not None and first.usage.output_tokens_details.reasoning_tokens > 0

    again = client.responses.retrieve(first.id)
    assert again.output[0].model_dump() == thought.model_dump()

    # Continued: the reasoning is not sent back (input tokens are the questions' alone).
    second = client.responses.create(model=THINKING_MODEL, previous_response_id=first.id, input="And 3 + 3?",
                                     max_output_tokens=8, temperature=0)
    questions = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "user", "content": "And 3 + 3?"}]
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens(http, caller, questions)


def test_responses_stream_reasoning_and_can_turn_it_off(client: openai.OpenAI) -> None:
    kinds: list[str] = []
    pieces: list[str] = []
    with client.responses.stream(model=THINKING_MODEL, input="Name a fruit.", max_output_tokens=16,
                                 temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.reasoning_text.delta":
                pieces.append(event.delta)
            elif event.type == "response.incomplete":  # cut at max_output_tokens while it thought
                final = event.response
    assert kinds[-1] == "response.incomplete" and final.incomplete_details is not None
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.reasoning_text.done")
    assert "response.output_text.delta" not in kinds
    thought = final.output[0]
    assert isinstance(thought, ResponseReasoningItem) and thought.content
    assert thought.content[0].text == "".join(pieces)

    plain = client.responses.create(model=THINKING_MODEL, input="Say hello.", max_output_tokens=16, temperature=0,
                                    reasoning={"effort": "none"})
    assert [item.type for item in plain.output] == ["message"] and plain.output_text.strip()
    assert plain.reasoning is not None and plain.reasoning.effort == "none"


def test_anthropic_messages_answer_thinking_blocks_and_can_turn_them_off(think_stack: Stack, caller: Caller,
                                                                         client: openai.OpenAI) -> None:
    claude = anthropic.Anthropic(base_url=think_stack.url, api_key=caller.api_key, max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What is 5 + 5?"}]
    thought = claude.messages.create(model=THINKING_MODEL, max_tokens=16, messages=ask, extra_body={"temperature": 0},
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    assert [block.type for block in thought.content] == ["thinking"] and thought.content[0].thinking.strip()
    # The same (greedy) answer as chat completions: reasoning in a thinking block, the same end.
    same = client.chat.completions.create(model=THINKING_MODEL, max_tokens=16, messages=ask, temperature=0).choices[0]
    assert thought.content[0].thinking == same.message.reasoning_content
    assert thought.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[same.finish_reason]

    with claude.messages.stream(model=THINKING_MODEL, max_tokens=16, extra_body={"temperature": 0}, messages=[
            {"role": "user", "content": "Name a planet."}]) as stream:
        pieces = [event.thinking for event in stream if event.type == "thinking"]
        final = stream.get_final_message()
    assert len(pieces) > 1 and final.content[0].type == "thinking" and final.content[0].thinking == "".join(pieces)

    # Turned off: text only; a thinking block from an earlier turn (or another provider) is dropped.
    plain = claude.messages.create(model=THINKING_MODEL, max_tokens=16, thinking={"type": "disabled"}, messages=[
        *ask, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "c2ln"},
                                                {"type": "text", "text": "10."}]},
        {"role": "user", "content": "And 6 + 6?"}])
    assert [block.type for block in plain.content] == ["text"] and plain.content[0].text.strip()
