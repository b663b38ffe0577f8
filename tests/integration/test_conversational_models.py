"""Conversational models without a chat template, and encoder-decoders, through Envoy: one tiny model
of each architecture (GPT-2 as DialoGPT, Bloom, BlenderBot-small, T5; tests/tiny_models.py, taught one
exchange in its own format) served by the torch engine from a catalogue of local folders, with no
chat_format setting. Each answers through chat completions, streamed and whole, a session turn, a
WebSocket turn and the Responses API, and says the format chosen for it; what it cannot do is a 400
naming it. (The issue this answers: each of these requests was a 500.)"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from services.stack import Stack
from tests.integration.chat import chat, create_session, messages, text_of
from tests.integration.conftest import Caller, new_user, start_stack
from tests.tiny_models import ANSWER, ARCHITECTURES, make

DEFAULTS = {"gpt2": "dialogpt", "bloom": "transcript", "blenderbot-small": "blenderbot", "t5": "t5"}
HI = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0, "max_tokens": 16}


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("conversational")
    catalogue = [{"id": kind, "source": str(make(kind, data_dir / kind, taught=True)), "engine": "torch"}
                 for kind in ARCHITECTURES]
    (data_dir / "models.json").write_text(json.dumps(catalogue))
    running = start_stack(data_dir, PARLEY_MODELS_FILE=str(data_dir / "models.json"), PARLEY_DEFAULT_MODEL="gpt2",
                          PARLEY_CONTEXT_LENGTH="512", PARLEY_PARALLEL_SLOTS="1",
                          PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE="0", PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE="0")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def caller(tiny_stack: Stack) -> Caller:
    return new_user(tiny_stack.url, "tiny")


@pytest.fixture(scope="module")
def client(tiny_stack: Stack, caller: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_stack.url}/v1", api_key=caller.api_key, max_retries=0)


@pytest.fixture(scope="module")
def http(tiny_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_stack.url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_each_model_chats_and_says_its_format(kind: str, client: openai.OpenAI, http: httpx.Client,
                                              caller: Caller) -> None:
    whole = client.chat.completions.create(model=kind, messages=HI, **GREEDY)
    assert whole.choices[0].message.content == ANSWER and whole.choices[0].finish_reason == "stop"
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens >= 3
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(  # not the cached answer
        model=kind, messages=HI, stream=True, temperature=0, max_tokens=15) if c.choices]
    assert "".join(pieces) == ANSWER and len([p for p in pieces if p]) >= 2
    model = http.get(f"/v1/models/{kind}", headers=caller.headers)
    assert model.status_code == 200 and model.json()["chat_format"] == DEFAULTS[kind], model.text


def test_a_session_turn_with_an_encoder_decoder(http: httpx.Client, caller: Caller) -> None:
    sid = create_session(http, caller, model="blenderbot-small")["id"]
    events = chat(http, caller, sid, "hi", sampling={"temperature": 0, "max_tokens": 16})
    assert text_of(events) == ANSWER and events[-1]["done"]["finish_reason"] == "FINISH_REASON_STOP", events[-1]
    # A long conversation keeps its newest turns within BlenderBot's window instead of failing.
    for _ in range(6):
        events = chat(http, caller, sid, "tell me a story about a cat and the weather like in paris today",
                      sampling={"temperature": 0, "max_tokens": 16})
        assert "done" in events[-1], events[-1]
    assert len(messages(http, caller, sid)) == 14


async def test_a_websocket_turn_with_t5(tiny_stack: Stack, http: httpx.Client, caller: Caller) -> None:
    sid = create_session(http, caller, model="t5")["id"]
    url = f"ws://127.0.0.1:{tiny_stack.gateway.http_port}/v1/sessions/{sid}:connect"
    async with connect(url, additional_headers=caller.headers) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "chat", "content": "hi", "sampling": {"temperature": 0, "max_tokens": 16}}))
        events = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(await ws.recv()))
    assert events[-1]["type"] == "done", events[-1]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == ANSWER


def test_the_responses_api_with_a_causal_model_without_a_template(client: openai.OpenAI) -> None:
    response = client.responses.create(model="bloom", input="hi", temperature=0, max_output_tokens=16)
    assert response.status == "completed" and response.output_text == ANSWER


def test_what_a_model_cannot_do_is_a_400_naming_it(client: openai.OpenAI) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools: model 'gpt2' chats in the dialogpt format"):
        client.chat.completions.create(model="gpt2", messages=HI, tools=[weather], **GREEDY)
    with pytest.raises(openai.BadRequestError, match="model 't5' is an encoder-decoder"):
        client.chat.completions.create(model="t5", messages=HI, response_format={"type": "json_object"}, **GREEDY)
