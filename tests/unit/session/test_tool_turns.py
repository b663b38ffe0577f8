"""Tool turns through SessionService with a scripted inference and cache: calls are streamed and
stored, the next turn answers them, wrong answers are 400s that store nothing, and a cached call
comes back under a new id."""

from __future__ import annotations

import json

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from parley.cache.v1 import cache_pb2
from parley.inference.v1 import inference_pb2 as pb
from parley.session.v1 import session_pb2

from services.core.errors import InvalidArgument
from services.core.identity import Identity
from services.session.service import SessionService
from services.session.settings import SessionSettings
from services.session.store import SqlSessionStore as SqliteSessionStore

WEATHER = pb.StructuredOutput(tools=[pb.Tool(name="get_weather", parameters='{"type": "object"}')],
                              tool_choice="function", tool_choice_function="get_weather", parallel_tool_calls=False)
CALL = pb.ToolCall(id="call_oslo", name="get_weather", arguments='{"city": "Oslo"}')
USAGE = pb.Usage(prompt_tokens=40, completion_tokens=9, total_tokens=49)


class Generation:
    """A Generate call: its scripted responses, async-iterable and cancellable like grpc.aio's."""

    def __init__(self, responses: list[pb.GenerateResponse]) -> None:
        self.responses = responses

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[pb.GenerateResponse]:
        for response in self.responses:
            yield response

    def cancel(self) -> None:
        pass


class Inference:
    """Answers each Generate with the next script and records what it was asked."""

    def __init__(self) -> None:
        self.scripts: list[list[pb.GenerateResponse]] = []
        self.requests: list[pb.GenerateRequest] = []
        self.counted: list[pb.CountTokensRequest] = []

    async def GetModel(self, request: pb.GetModelRequest, **_: Any) -> pb.Model:
        return pb.Model(id="tiny", fingerprint="f1")

    async def CountTokens(self, request: pb.CountTokensRequest, **_: Any) -> pb.CountTokensResponse:
        self.counted.append(request)
        return pb.CountTokensResponse(total_tokens=10 * len(request.messages) + 5,
                                      message_tokens=[10] * len(request.messages), context_length=4096)

    def Generate(self, request: pb.GenerateRequest, **_: Any) -> Generation:
        self.requests.append(request)
        return Generation(self.scripts.pop(0))


class Cache:
    def __init__(self) -> None:
        self.entries: dict[bytes, cache_pb2.CachedCompletion] = {}

    @staticmethod
    def _key(key: cache_pb2.CompletionKey) -> bytes:
        return key.SerializeToString(deterministic=True)

    async def lookup(self, key: cache_pb2.CompletionKey) -> cache_pb2.CachedCompletion | None:
        return self.entries.get(self._key(key))

    async def store(self, key: cache_pb2.CompletionKey, completion: cache_pb2.CachedCompletion) -> bool:
        self.entries[self._key(key)] = completion
        return True

    async def check_rate_limit(self) -> None:
        pass

    async def record_usage(self, tokens: int) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteSessionStore]:
    s = SqliteSessionStore(tmp_path / "session.db")
    yield s
    s.close()


@pytest.fixture
def inference() -> Inference:
    return Inference()


@pytest.fixture
def service(store: SqliteSessionStore, inference: Inference, monkeypatch: pytest.MonkeyPatch) -> SessionService:
    # The caller, as the identity interceptor would have set it.
    alice = Identity("alice", "alice", frozenset({"user"}))
    monkeypatch.setattr("services.session.service.current_identity", lambda: alice)
    return SessionService(store, SessionSettings(), inference, Cache())  # type: ignore[arg-type]


async def turn(service: SessionService, session_id: str, content: str = "", **fields: Any) -> list[session_pb2.ChatResponse]:
    request = session_pb2.ChatRequest(session_id=session_id, content=content, **fields)
    events = [event async for event in service.chat(request)]
    await service.close()  # lets the cache store finish
    return events


def calls_of(events: list[session_pb2.ChatResponse]) -> list[pb.ToolCall]:
    return [c for e in events if e.HasField("delta") for c in e.delta.tool_calls]


def called_weather(inference: Inference) -> None:
    inference.scripts.append([pb.GenerateResponse(tool_calls=[CALL]),
                              pb.GenerateResponse(finish_reason=pb.FINISH_REASON_TOOL_CALLS, usage=USAGE)])


async def test_calls_are_streamed_stored_and_answered_next_turn(service: SessionService, store: SqliteSessionStore,
                                                                inference: Inference) -> None:
    sid = store.create_session("alice", title="", model="", system_prompt="Be brief.", sampling={}).id
    called_weather(inference)
    events = await turn(service, sid, "Weather in Oslo?", structured=WEATHER)
    assert calls_of(events) == [CALL]
    assert events[-1].done.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert inference.requests[0].structured.tool_choice_function == "get_weather"
    # The history was fitted with the tools' description counted.
    assert inference.counted[0].structured == inference.requests[0].structured
    asked = store.list_messages("alice", sid)[-1]
    assert (asked.role, asked.status, [c.id for c in asked.tool_calls]) == ("assistant", "complete", ["call_oslo"])

    inference.scripts.append([pb.GenerateResponse(text="It is 12 C in Oslo."),
                              pb.GenerateResponse(finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])
    events = await turn(service, sid, tool_results=[session_pb2.ToolResult(tool_call_id="call_oslo", content="12 C")])
    start = events[0].start
    assert start.user_message_id == "" and len(start.tool_message_ids) == 1
    # The model saw the call and its result, converted as inference converts them.
    sent = inference.requests[1].messages
    assert [(m.role, m.content, [c.id for c in m.tool_calls], m.tool_call_id) for m in sent] == [
        ("system", "Be brief.", [], ""), ("user", "Weather in Oslo?", [], ""), ("assistant", "", ["call_oslo"], ""),
        ("tool", "12 C", [], "call_oslo")]
    assert inference.counted[-1].messages == sent
    stored = store.list_messages("alice", sid)
    assert [(m.role, m.content) for m in stored[2:]] == [("tool", "12 C"), ("assistant", "It is 12 C in Oslo.")]
    assert stored[2].id == start.tool_message_ids[0] and stored[2].tool_call_id == "call_oslo"


@pytest.mark.parametrize("fields, words", [
    ({}, "content must not be empty"),
    ({"tool_results": [session_pb2.ToolResult(tool_call_id="call_nope", content="x")]}, "'call_nope'"),
    ({"tool_results": [session_pb2.ToolResult(tool_call_id="call_oslo", content="x")] * 2}, "second time"),
    ({"content": "hi", "structured": pb.StructuredOutput(tool_choice="required")}, "needs tools"),
    ({"content": "hi", "structured": pb.StructuredOutput(response_format="json_schema", json_schema=json.dumps(
        {"type": "array", "uniqueItems": True}))}, "uniqueItems"),
])
async def test_bad_tool_turns_are_invalid_and_store_nothing(service: SessionService, store: SqliteSessionStore,
                                                            inference: Inference, fields: dict, words: str) -> None:
    sid = store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
    called_weather(inference)
    await turn(service, sid, "Weather in Oslo?", structured=WEATHER)
    before = store.list_messages("alice", sid)
    with pytest.raises(InvalidArgument, match=words):
        await turn(service, sid, **fields)
    assert store.list_messages("alice", sid) == before


async def test_an_answered_call_cannot_be_answered_again(service: SessionService, store: SqliteSessionStore,
                                                         inference: Inference) -> None:
    sid = store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
    called_weather(inference)
    await turn(service, sid, "Weather in Oslo?", structured=WEATHER)
    result = session_pb2.ToolResult(tool_call_id="call_oslo", content="12 C")
    inference.scripts.append([pb.GenerateResponse(text="12 C.", finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])
    await turn(service, sid, tool_results=[result])
    with pytest.raises(InvalidArgument, match="'call_oslo' answers no unanswered"):
        await turn(service, sid, tool_results=[result])


async def test_a_cached_call_is_replayed_under_a_new_id(service: SessionService, store: SqliteSessionStore,
                                                        inference: Inference) -> None:
    greedy = pb.SamplingParams(temperature=0)
    first, second = (store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
                     for _ in range(2))
    called_weather(inference)
    await turn(service, first, "Weather in Oslo?", structured=WEATHER, sampling=greedy)
    events = await turn(service, second, "Weather in Oslo?", structured=WEATHER, sampling=greedy)
    assert events[-1].done.cached and events[-1].done.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    [replayed] = calls_of(events)
    assert (replayed.name, replayed.arguments) == (CALL.name, CALL.arguments) and replayed.id != CALL.id
    assert store.list_messages("alice", second)[-1].tool_calls[0].id == replayed.id
    # Without the tools the same question is another request.
    inference.scripts.append([pb.GenerateResponse(text="Sunny.", finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])
    events = await turn(service, store.create_session("alice", title="", model="", system_prompt="", sampling={}).id,
                        "Weather in Oslo?", sampling=greedy)
    assert not events[-1].done.cached and calls_of(events) == []


async def test_a_stream_closed_after_its_first_pieces_keeps_what_was_sent(service: SessionService,
                                                                          store: SqliteSessionStore,
                                                                          inference: Inference) -> None:
    """The client goes away while the turn waits at a `yield` (gRPC closes the generator: GeneratorExit,
    not CancelledError): the answer keeps every piece the client got."""
    sid = store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
    inference.scripts.append([pb.GenerateResponse(text="Once upon"), pb.GenerateResponse(text=" a time"),
                              pb.GenerateResponse(text=" there was", finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])
    stream = service.chat(session_pb2.ChatRequest(session_id=sid, content="Tell me a story."))
    got = [await anext(stream), await anext(stream), await anext(stream)]  # start, then two pieces
    assert [e.delta.text for e in got[1:]] == ["Once upon", " a time"]
    await stream.aclose()
    answer = store.list_messages("alice", sid)[-1]
    assert (answer.role, answer.content, answer.status) == ("assistant", "Once upon a time", "incomplete")
    assert store.acquire_turn(sid, "the next turn", 30)  # the lease was given back
