"""Anthropic's Messages API through Envoy with the real bundled model, driven by the clients people
use with it: the `anthropic` SDK (create, stream, tools with a tool_result follow-up, streamed tool
input, count_tokens, models.list, its typed errors) and LangChain's ChatAnthropic (invoke, stream,
bind_tools). Both send the key as `x-api-key` with `anthropic-version`, as Claude Code does.

The model is tiny and its answers are silly; what is asserted is what these clients rely on: the
shapes of blocks and events, tool inputs that validate against the tool's schema, stop reasons and
usage that agree with count_tokens, and errors the SDK raises as its typed exceptions."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from services.stack import Stack
from tests.integration.conftest import Caller, new_user, sign_in, ADMIN_PASSWORD

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                     "required": ["city", "unit"], "additionalProperties": False},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def user(stack: Stack) -> Caller:
    return new_user(stack.url, "claude")


@pytest.fixture(scope="module")
def client(stack: Stack, user: Caller) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=user.api_key, max_retries=0, timeout=120)


# This SDK no longer sends sampling parameters itself; Parley takes them as the API always did.
GREEDY = {"temperature": 0}


def create(client: anthropic.Anthropic, **extra: Any) -> Any:
    return client.messages.create(**{"model": MODEL, "max_tokens": 16, "messages": ASK, "extra_body": GREEDY,
                                     **extra})


def test_create_answers_a_message_whose_usage_agrees_with_count_tokens(client: anthropic.Anthropic) -> None:
    system = "You are terse."
    message = create(client, system=system)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"] and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 0 < message.usage.output_tokens <= 16
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens > 0


def test_a_stop_sequence_is_named_as_the_stop_reason(client: anthropic.Anthropic) -> None:
    message = create(client, stop_sequences=[" "], messages=[{"role": "user", "content": "Write a long sentence."}])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " ")
    assert " " not in message.content[0].text


def test_stream_sends_anthropics_events_and_the_sdk_assembles_them(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Tell me about the sea."}]  # not the cached question: live tokens
    with client.messages.stream(model=MODEL, max_tokens=12, messages=ask, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert "text" in kinds  # the SDK's event for each text_delta
    assert final.content[0].type == "text" and final.content[0].text.strip()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    assert final.usage.input_tokens == client.messages.count_tokens(model=MODEL, messages=ask).input_tokens


def test_tool_use_then_a_tool_result_follow_up(client: anthropic.Anthropic) -> None:
    first = create(client, max_tokens=48, tools=[WEATHER],
                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert first.stop_reason == "tool_use"
    calls = [block for block in first.content if block.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id
    jsonschema.validate(calls[0].input, WEATHER["input_schema"])
    follow_up = ASK + [{"role": "assistant", "content": first.content},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id,
                                                     "content": "Sunny, 24 degrees."}]}]
    second = create(client, tools=[WEATHER], tool_choice={"type": "none"}, messages=follow_up)
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in second.content] == ["text"]


def test_tool_input_streams_as_input_json_deltas(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Weather in Oslo, in fahrenheit?"}]
    with client.messages.stream(model=MODEL, max_tokens=48, messages=ask, tools=[WEATHER], extra_body=GREEDY,
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        pieces = [event.partial_json for event in stream if event.type == "input_json"]
        final = stream.get_final_message()
    call = next(block for block in final.content if block.type == "tool_use")
    assert len(pieces) > 1  # written piece by piece, not whole at the end
    jsonschema.validate(call.input, WEATHER["input_schema"])
    assert final.stop_reason == "tool_use"


def test_models_list_reads_the_catalogue(client: anthropic.Anthropic) -> None:
    models = {model.id: model for model in client.models.list()}
    assert MODEL in models
    assert models[MODEL].type == "model" and models[MODEL].display_name == MODEL
    assert models[MODEL].created_at.year >= 2000


def test_errors_are_the_sdks_typed_errors(stack: Stack, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=stack.url, api_key="pk-not-a-key", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=ASK)
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as caught:
        create(client, model="claude-not-served-here")
    assert "claude-not-served-here" in caught.value.message
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert "image" in caught.value.message
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client, max_tokens=0)


def test_a_rate_limited_caller_gets_rate_limit_error_with_retry_after(stack: Stack) -> None:
    limited, admin = new_user(stack.url, "limited"), sign_in(stack.url, "admin", ADMIN_PASSWORD)
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        me = http.get("/v1/users/me", headers=limited.headers).json()
        lowered = http.patch(f"/v1/rate-limits/{me['id']}", headers=admin.headers, json={"requests_per_minute": 1})
        assert lowered.status_code == 200, lowered.text
    client = anthropic.Anthropic(base_url=stack.url, api_key=limited.api_key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        for _ in range(3):
            client.messages.count_tokens(model=MODEL, messages=ASK)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_gateway_errors_take_anthropics_shape(stack: Stack, user: Caller) -> None:
    headers = {"x-api-key": user.api_key, "anthropic-version": "2023-06-01"}
    too_large = httpx.post(f"{stack.url}/v1/messages", headers=headers, content=b"x" * (2 * 1024 * 1024), timeout=30)
    assert too_large.status_code == 413
    assert too_large.json()["type"] == "error" and too_large.json()["error"]["type"] == "request_too_large"
    missing = httpx.post(f"{stack.url}/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": ASK},
                         timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    # Claude Code's beta requests carry ?beta=true.
    beta = httpx.post(f"{stack.url}/v1/messages?beta=true", headers=headers, timeout=60,
                      json={"model": MODEL, "max_tokens": 4, "messages": ASK})
    assert beta.status_code == 200, beta.text
    unknown = httpx.post(f"{stack.url}/v1/messages/batches", headers=headers, json={}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    assert "/v1/messages/batches" in unknown.json()["error"]["message"]
    # GET /v1/models answers an Anthropic client's error in Anthropic's shape, an OpenAI client's in OpenAI's.
    anonymous = httpx.get(f"{stack.url}/v1/models", headers={"anthropic-version": "2023-06-01"}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["type"] == "error"
    assert "type" not in httpx.get(f"{stack.url}/v1/models", timeout=30).json()


def langchain(stack: Stack, user: Caller, **extra: Any) -> Any:
    from langchain_anthropic import ChatAnthropic

    settings = {"max_tokens": 24, "temperature": 0, **extra}
    return ChatAnthropic(model=MODEL, base_url=stack.url, api_key=user.api_key, max_retries=0, **settings)


def test_langchain_invoke_and_stream(stack: Stack, user: Caller) -> None:
    answer = langchain(stack, user).invoke("Say hello.")
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.usage_metadata["input_tokens"] > 0
    pieces = list(langchain(stack, user).stream("Name a colour."))
    assert len(pieces) > 1 and "".join(p.text for p in pieces).strip()


def test_langchain_bind_tools_calls_the_tool(stack: Stack, user: Caller) -> None:
    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city (unit: celsius or fahrenheit)."""
        return "sunny"

    model = langchain(stack, user, max_tokens=48).bind_tools([get_weather], tool_choice="get_weather")
    answer = model.invoke("What is the weather in Rome?")
    assert [call["name"] for call in answer.tool_calls] == ["get_weather"]
    assert set(answer.tool_calls[0]["args"]) == {"city", "unit"} and answer.tool_calls[0]["id"]
