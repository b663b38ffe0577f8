"""Tool turns through SessionService with a scripted inference: calls are streamed and stored, the
next turn answers them, and wrong answers are 400s that store nothing. (A cached call replayed under
a new id: tests/unit/test_completion_flow.py.)"""

from __future__ import annotations

import json

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
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


class Call:
    """A Generate call: its scripted responses (an exception among them is raised), read and
    cancelled like grpc.aio's."""

    def __init__(self, responses: list[Any]) -> None:
        self.responses = responses

    async def read(self) -> Any:
        if not self.responses:
            return grpc.aio.EOF
        item = self.responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        pass


class Inference:
    """Answers each Generate with the next script and records what it was asked."""

    def __init__(self) -> None:
        self.scripts: list[list[pb.GenerateResponse]] = []
        self.requests: list[pb.GenerateRequest] = []

    def Generate(self, request: pb.GenerateRequest, **_: Any) -> Call:
        self.requests.append(request)
        return Call([pb.GenerateResponse(start=pb.GenerateStart(model="tiny", model_fingerprint="f1")),
                     *self.scripts.pop(0)])


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
    return SessionService(store, SessionSettings(), inference)  # type: ignore[arg-type]


async def turn(service: SessionService, session_id: str, content: str = "", **fields: Any) -> list[session_pb2.ChatResponse]:
    request = session_pb2.ChatRequest(session_id=session_id, content=content, **fields)
    return [event async for event in service.chat(request)]


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
    assert inference.requests[0].fit.keep_last == 1
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
    assert inference.requests[1].fit.keep_last == 2  # the result stays with the answer whose call it answers
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
