"""Anthropic's Messages API without a stack: a request's JSON as the completion flow's request
(services.wire.anthropic), the flow's chunks as Anthropic's events and Message
(wire.anthropic_stream), checked against the `anthropic` SDK's own stream accumulator, and the
flow's queue places, failures and answers as the bytes /v1/messages sends
(services.inference.endpoints.messages)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from anthropic.lib.streaming._messages import accumulate_event

from services.core.errors import InvalidArgument, NotFound
from services.core.structured import ToolCall
from services.inference.endpoints.messages import Messages
from services.inference.engines.base import Chunk, EngineError, Usage
from services.inference.flow.metered import MeteredCompletions
from services.inference.flow.service import Admitted, Queued
from services.inference.models.grammars import CallDelta
from services.wire import anthropic
from services.wire.anthropic_stream import MessageBuilder

WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def request(**body: Any) -> anthropic.MessagesRequest:
    return anthropic.parse_request(json.dumps({"model": "tiny", "max_tokens": 8, **body}).encode())


def test_a_tool_round_trip_becomes_the_engines_chat() -> None:
    req = request(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call it.", "signature": "c2ln"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "And tomorrow?"}]},
    ], tools=[WEATHER], stop_sequences=["END"], temperature=0.5, top_k=4, metadata={"user_id": "u1"})
    assert req.messages == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.",
         "tool_calls": [ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "content": "sunny", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.top_k) == (8, 0.5, 4)
    assert req.stop_sequences == ("END",)
    assert [t.name for t in req.structure.tools] == ["get_weather"]
    assert json.loads(req.structure.tools[0].parameters) == WEATHER["input_schema"]
    assert req.structure.tool_choice == "auto" and req.structure.parallel


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, ("auto", "", True)),
    ({"type": "any", "disable_parallel_tool_use": True}, ("required", "", False)),
    ({"type": "tool", "name": "get_weather"}, ("function", "get_weather", True)),
    ({"type": "none"}, ("none", "", True)),
])
def test_tool_choice_maps_onto_the_openai_paths_choices(choice: dict[str, Any], expected: tuple[Any, ...]) -> None:
    structure = request(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice=choice).structure
    assert (structure.tool_choice, structure.function, structure.parallel) == expected


@pytest.mark.parametrize("thinking, effort, thinks", [
    (None, "", True), ({"type": "disabled"}, "none", False), ({"type": "enabled", "budget_tokens": 1024}, "low", True),
    ({"type": "enabled", "budget_tokens": 32000}, "high", True)])
def test_thinking_maps_onto_the_template_options(thinking: Any, effort: str, thinks: bool) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]} | ({"thinking": thinking} if thinking else {})
    template = request(**body).structure.template
    assert (template.reasoning_effort, template.thinking) == (effort, thinks)


def test_output_config_gives_the_effort_and_a_json_schema_format() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    structure = request(messages=[{"role": "user", "content": "hi"}], thinking={"type": "adaptive"},
                        output_config={"effort": "max", "format": {"type": "json_schema", "schema": schema}}).structure
    assert (structure.format, json.loads(structure.schema), structure.template.reasoning_effort) == (
        "json_schema", schema, "high")


@pytest.mark.parametrize("body, says", [
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens is required"),
    ({"model": "tiny", "max_tokens": 8, "messages": []}, "messages"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}, "model is required"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     "messages[0].content[0]: image blocks are not supported"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}, "role"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
     "messages[0].content[0]"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "only client tools"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "nope"}}, "not among tools"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
      "thinking": {"type": "enabled"}}, "budget_tokens"),
    ({"model": "tiny", "max_tokens": "8", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "metadata": []}, "metadata"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": {}}},
     "tool_choice"),
    ({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
      "output_config": {"effort": []}}, "output_config.effort"),
])
def test_bad_requests_are_400_naming_what_is_wrong(body: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        anthropic.parse_request(json.dumps(body).encode())
    assert says in caught.value.message


def test_count_tokens_needs_no_max_tokens() -> None:
    model, messages, structure = anthropic.parse_count_request(
        json.dumps({"model": "tiny", "system": "Be brief.", "messages": [{"role": "user", "content": "hi"}],
                    "tools": [WEATHER]}).encode())
    assert model == "tiny" and [m["role"] for m in messages] == ["system", "user"] and structure.tools


@pytest.mark.parametrize("code, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"), (grpc.StatusCode.UNAUTHENTICATED,
                                                                  "authentication_error"),
    (grpc.StatusCode.PERMISSION_DENIED, "permission_error"), (grpc.StatusCode.NOT_FOUND, "not_found_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"), (grpc.StatusCode.UNAVAILABLE, "overloaded_error"),
    (grpc.StatusCode.INTERNAL, "api_error")])
def test_errors_take_anthropics_shape(code: grpc.StatusCode, kind: str) -> None:
    assert anthropic.error_json(code, "why") == {"type": "error", "error": {"type": kind, "message": "why"}}


# A reasoning model's answer that thinks, says something, then writes one call piece by piece and
# finishes with it; then a second call that was not streamed.
CHUNKS = [
    Chunk(reasoning="Need the "), Chunk(reasoning="weather."), Chunk(text="Checking."),
    Chunk(call_deltas=[CallDelta(0, "call_a", "get_weather", "")]),
    Chunk(call_deltas=[CallDelta(0, arguments='{"city": ')]), Chunk(call_deltas=[CallDelta(0, arguments='"Oslo"}')]),
    Chunk(tool_calls=[ToolCall("call_a", "get_weather", '{"city": "Oslo"}'),
                      ToolCall("call_b", "get_weather", '{"city": "Rome"}')],
          finish_reason="tool_calls", usage=Usage(prompt_tokens=12, completion_tokens=9)),
]


def test_chunks_become_anthropics_event_sequence_and_the_sdk_assembles_the_same_message() -> None:
    builder = MessageBuilder("tiny", 12)
    events = [builder.start()] + [event for chunk in CHUNKS for event in builder.add(chunk)]
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    deltas = [data["delta"]["type"] for name, data in events if name == "content_block_delta"]
    assert deltas == ["thinking_delta", "thinking_delta", "text_delta", "input_json_delta", "input_json_delta",
                      "input_json_delta"]
    assert all(data["type"] == name for name, data in events)
    message = builder.message()
    assert message["content"] == [
        {"type": "thinking", "thinking": "Need the weather.", "signature": ""},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Rome"}}]
    assert message["stop_reason"] == "tool_use" and message["usage"]["output_tokens"] == 9
    assert events[-2][1]["usage"] == {"input_tokens": 12, "output_tokens": 9}

    snapshot, buffers = None, {}
    for _, data in events:
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    assert snapshot.model_dump(exclude_none=True)["content"] == message["content"]
    assert snapshot.stop_reason == "tool_use" and snapshot.usage.output_tokens == 9


@pytest.mark.parametrize("matched, reason, sequence", [("END", "stop_sequence", "END"),
                                                       ("<|im_end|>", "end_turn", None), ("", "end_turn", None)])
def test_the_stop_reason_names_only_the_callers_stop_sequences(matched: str, reason: str, sequence: Any) -> None:
    builder = MessageBuilder("tiny", 3, ("END",))
    builder.add(Chunk(text="Hi", finish_reason="stop", usage=Usage(3, 1), stop_sequence=matched))
    assert (builder.message()["stop_reason"], builder.message()["stop_sequence"]) == (reason, sequence)


def test_length_is_max_tokens_and_an_empty_answer_is_one_empty_text_block() -> None:
    builder = MessageBuilder("tiny", 3)
    builder.add(Chunk(finish_reason="length", usage=Usage(3, 8)))
    assert builder.message()["content"] == [{"type": "text", "text": ""}]
    assert builder.message()["stop_reason"] == "max_tokens"


RECORD = SimpleNamespace(entry=SimpleNamespace(id="tiny"), fingerprint=lambda: "1-2")


class Scripted:
    """Generation that yields `items` (Admitted where "admit" stands), then raises `error` if given."""

    def __init__(self, items: list[Any], error: Exception | None = None) -> None:
        self.items, self.error = items, error

    async def generate(self, *args: Any, **kwargs: Any):
        self.report_queue = kwargs["report_queue"]
        for item in self.items:
            yield Admitted(RECORD, 5, 0) if item == "admit" else item  # type: ignore[arg-type]
        if self.error is not None:
            raise self.error


async def run(generation: Scripted, stream: bool) -> tuple[list[str], list[tuple[str, bytes]]]:
    marks: list[str] = []

    async def mark(value: str) -> None:
        marks.append(value)

    api = Messages(MeteredCompletions(generation, registry=None, cache=None))  # type: ignore[arg-type]
    body = json.dumps({"model": "tiny", "max_tokens": 8, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return marks, [part async for part in api.create(body, None, mark)]


def events_of(parts: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, Any]]]:
    text = b"".join(data for _, data in parts).decode()
    out = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_a_queued_stream_pings_then_fails_midway_with_an_error_event() -> None:
    generation = Scripted([Queued(2, 1.0), Queued(1, 0.5), "admit", Chunk(text="Hel")],
                          EngineError("generation failed: llama_decode returned -3"))
    marks, parts = await run(generation, stream=True)
    assert generation.report_queue  # a stream asks for its place in the queue
    assert marks == ["miss"] and {kind for kind, _ in parts} == {"text/event-stream"}
    events = events_of(parts)
    assert [name for name, _ in events] == ["ping", "ping", "message_start", "content_block_start",
                                            "content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error",
                                                        "message": "generation failed: llama_decode returned -3"}}


@pytest.mark.parametrize("items, stream", [([], True), (["admit", Chunk(text="Hel")], False)])
async def test_before_any_byte_or_without_a_stream_the_failure_is_the_status(items: list[Any], stream: bool) -> None:
    with pytest.raises(NotFound):
        await run(Scripted(items, NotFound("model 'tiny' not found")), stream)


async def test_an_answer_is_one_json_message() -> None:
    generation = Scripted(["admit", Chunk(text="Hello"), Chunk(text="!", finish_reason="stop", usage=Usage(5, 2))])
    marks, parts = await run(generation, stream=False)
    assert marks == ["miss"] and len(parts) == 1 and parts[0][0] == "application/json"
    message = json.loads(parts[0][1])
    assert message["content"] == [{"type": "text", "text": "Hello!"}] and message["id"].startswith("msg_")
    assert (message["stop_reason"], message["usage"]["input_tokens"], message["usage"]["output_tokens"]) == (
        "end_turn", 5, 2)
