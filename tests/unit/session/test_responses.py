"""The Responses API without a model: request parsing (and the 400 each wrong value gets), the event
stream's shape, and the flow over a real SQLite store with a scripted inference — what is stored,
appended, forked or kept, and the affinity header each answer is routed by."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from parley.inference.v1 import inference_pb2 as pb

from services.core import structured
from services.core.errors import Aborted, InvalidArgument, NotFound, ParleyError
from services.core.identity import Identity
from services.core.structured import ToolCall
from services.wire import openai_response_events as rendering
from services.wire import openai_responses as wire
from services.session.history import Turn
from services.session.responses import Responses
from services.session.service import AFFINITY_HEADER, SessionService
from services.session.settings import SessionSettings
from services.session.store import SqliteSessionStore
from tests.unit.session.test_tool_turns import Call

USAGE = pb.Usage(prompt_tokens=12, completion_tokens=3, total_tokens=15)
CALL = pb.ToolCall(id="call_abc", name="get_weather", arguments='{"city": "Oslo"}')


def parse(**body: Any) -> wire.ResponseRequest:
    return wire.parse_request(json.dumps(body).encode())


# --- parsing -----------------------------------------------------------------------------------------

def test_items_become_turns_and_the_system_prompt() -> None:
    req = parse(model="m", instructions="Be brief.", input=[
        {"role": "developer", "content": "Use metric units."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look.",
                                                              "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}", "id": "fc_1"},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
        {"type": "reasoning", "summary": []},
    ])
    assert req.system == "Be brief.\n\nUse metric units."
    assert req.inputs == [
        Turn("user", "Weather?"),
        Turn("assistant", "Let me look.", (ToolCall("call_1", "get_weather", "{}"), ToolCall("call_2", "get_time", "{}"))),
        Turn("tool", "18 C", tool_call_id="call_1"),
    ]
    assert (req.store, req.stream, req.previous_response_id) == (True, False, "")
    assert parse(input="Hi").inputs == [Turn("user", "Hi")]


def test_tools_format_and_sampling_map_to_structure_and_echo() -> None:
    req = parse(input="Hi", temperature=0.5, top_p=0.9, max_output_tokens=20, metadata={"k": "v"},
                tools=[{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
                tool_choice={"type": "function", "name": "f"}, parallel_tool_calls=False,
                text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}})
    assert (req.structure.tool_choice, req.structure.function, req.structure.parallel) == ("function", "f", False)
    assert (req.structure.format, json.loads(req.structure.schema)) == ("json_schema", {"type": "object"})
    assert (req.sampling.max_tokens, round(req.sampling.temperature, 3)) == (20, 0.5)
    assert req.echo["tool_choice"] == {"type": "function", "name": "f"} and req.echo["metadata"] == {"k": "v"}
    assert req.echo["tools"][0]["name"] == "f" and req.echo["text"]["format"]["name"] == "x"
    assert parse(input="Hi", text={"format": {"type": "json_object"}}).structure.format == "json_object"


@pytest.mark.parametrize("body, words", [
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "previous_response_id"),
    ({}, "input is required"),
    ({"input": 3}, "input must be"),
    ({"input": [{"type": "image_generation_call"}]}, "not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "only text parts"),
    ({"input": [{"role": "critic", "content": "x"}]}, "role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "call_id"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "call_id"),
    ({"input": "x", "tools": [{"type": "file_search"}]}, "only function tools"),
    ({"input": "x", "tool_choice": "always"}, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "needs tools"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "store": "yes"}, "store must be a boolean"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
])
def test_wrong_requests_are_400s_naming_what_is_wrong(body: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        wire.parse_request(json.dumps(body).encode())


@pytest.mark.parametrize("data", [b"", b"{", b"[1]", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_a_400(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        wire.parse_request(data)


def test_response_ids_name_messages_and_nothing_else_is_found() -> None:
    assert wire.message_id_of("resp_abc") == "abc"
    for bad in ("abc", "resp_", "msg_abc", "resp_" + "x" * 65):
        with pytest.raises(NotFound):
            wire.message_id_of(bad)


# --- the event stream ----------------------------------------------------------------------------------

def events_of(chunks: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for chunk in chunks:
        head, data = chunk.decode().split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}" and chunk.endswith(b"\n\n")
        out.append(event)
    return out


def test_text_then_a_call_streams_items_in_order_with_sequence_numbers() -> None:
    writer = rendering.EventWriter("resp_m1", "m1", "tiny", {"instructions": None})
    chunks = writer.start() + writer.delta("Hel", []) + writer.delta("lo", [])
    chunks += writer.delta("", [ToolCall("call_x", "f", '{"a": 1}')]) + writer.finish(pb.FINISH_REASON_TOOL_CALLS, USAGE)
    events = events_of(chunks)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["id"] == "resp_m1"
    assert final["output"] == [rendering.message_item("msg_m1", "Hello", "completed"),
                               rendering.call_item(ToolCall("call_x", "f", '{"a": 1}'))]
    assert final["output"][1]["id"] == "fc_x"
    assert final["usage"] == {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None


def test_an_answer_cut_by_max_output_tokens_is_incomplete_and_an_empty_one_is_a_message() -> None:
    writer = rendering.EventWriter("resp_m", "m", "tiny", {})
    events = events_of(writer.start() + writer.finish(pb.FINISH_REASON_LENGTH, USAGE))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"] == [rendering.message_item("msg_m", "", "incomplete")]


def test_a_failure_mid_stream_is_response_failed() -> None:
    writer = rendering.EventWriter("resp_m", "m", "tiny", {})
    events = events_of(writer.start() + writer.delta("partial", []) + writer.fail("engine died"))
    assert [e["type"] for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                                "response.output_item.done", "response.failed"]
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "engine died"}


def test_input_item_pages() -> None:
    items = [{"id": f"i{n}"} for n in range(5)]
    assert [i["id"] for i in rendering.item_list_json(items, 0, "", "")["data"]] == ["i4", "i3", "i2", "i1", "i0"]
    page = rendering.item_list_json(items, 2, "asc", "i1")
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("i2", "i3", True)
    for limit, order, after in ((101, "", ""), (1, "up", ""), (1, "asc", "nope")):
        with pytest.raises(InvalidArgument):
            rendering.item_list_json(items, limit, order, after)


# --- the flow over a real store ------------------------------------------------------------------------

class Inference:
    """Answers each Generate with `start`, the next script, and a final message; records requests
    and their affinity header."""

    def __init__(self) -> None:
        self.scripts: list[list[Any]] = []
        self.requests: list[pb.GenerateRequest] = []
        self.affinity: list[str] = []
        self.refuse: Exception | None = None

    def Generate(self, request: pb.GenerateRequest, metadata: Any = (), **_: Any) -> Call:
        self.requests.append(request)
        self.affinity.append(dict(metadata)[AFFINITY_HEADER])
        if self.refuse is not None:
            return Call([self.refuse])
        script = self.scripts.pop(0) if self.scripts else [pb.GenerateResponse(text="Fine.")]
        finish = pb.FINISH_REASON_TOOL_CALLS if any(getattr(r, "tool_calls", None) for r in script) else pb.FINISH_REASON_STOP
        return Call([pb.GenerateResponse(start=pb.GenerateStart(model="tiny")), *script,
                     pb.GenerateResponse(finish_reason=finish, usage=USAGE)])


class Refused(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "slow down")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteSessionStore]:
    s = SqliteSessionStore(tmp_path / "session.db")
    yield s
    s.close()


@pytest.fixture
def inference() -> Inference:
    return Inference()


@pytest.fixture
def who(monkeypatch: pytest.MonkeyPatch) -> dict[str, Identity]:
    current = {"id": Identity("alice", "alice", frozenset({"user"}))}
    for module in ("services.session.service", "services.session.responses"):
        monkeypatch.setattr(f"{module}.current_identity", lambda: current["id"])
    return current


@pytest.fixture
def api(store: SqliteSessionStore, inference: Inference, who: dict[str, Identity]) -> Responses:
    return Responses(SessionService(store, SessionSettings(), inference))  # type: ignore[arg-type]


async def create(api: Responses, **body: Any) -> dict[str, Any]:
    parts = [part async for part in api.create(json.dumps(body).encode())]
    assert [kind for kind, _ in parts] == [rendering.JSON]
    return json.loads(parts[0][1])


def session_ids(store: SqliteSessionStore, owner: str = "alice") -> list[str]:
    return [s.id for s in store.list_sessions(owner, 100, None)]


async def test_a_chain_appends_forks_and_routes_by_its_session(api: Responses, store: SqliteSessionStore,
                                                               inference: Inference) -> None:
    first = await create(api, input="Hi", instructions="Be kind.")
    [sid] = session_ids(store)
    assert first["id"] == "resp_" + store.list_messages("alice", sid)[-1].id
    assert store.get_session("alice", sid).system_prompt == "Be kind."
    assert inference.affinity[0] == sid  # the new session's id, chosen before it is stored

    second = await create(api, input="More", previous_response_id=first["id"])
    assert session_ids(store) == [sid] and inference.affinity[1] == sid
    assert [m.content for m in store.list_messages("alice", sid)] == ["Hi", "Fine.", "More", "Fine."]
    # The previous turn went to the model, with the session's system prompt (no new instructions).
    assert [(m.role, m.content) for m in inference.requests[1].messages] == [
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Fine."), ("user", "More")]

    fork = await create(api, input="Other", previous_response_id=first["id"], instructions="Be terse.")
    assert len(session_ids(store)) == 2
    forked = next(s for s in session_ids(store) if s != sid)
    assert [m.content for m in store.list_messages("alice", forked)] == ["Hi", "Fine.", "Other", "Fine."]
    assert [m.content for m in store.list_messages("alice", sid)] == ["Hi", "Fine.", "More", "Fine."]
    assert fork["id"] == "resp_" + store.list_messages("alice", forked)[-1].id
    assert inference.requests[2].messages[0].content == "Be terse."
    assert [(m.role, m.content) for m in inference.requests[2].messages[1:]] == [
        ("user", "Hi"), ("assistant", "Fine."), ("user", "Other")]
    got = json.loads(await api.get(second["id"]))
    assert (got["status"], got["output"][0]["content"][0]["text"], got["previous_response_id"]) == (
        "completed", "Fine.", first["id"])


async def test_a_tool_call_then_its_output(api: Responses, store: SqliteSessionStore, inference: Inference) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    inference.scripts.append([pb.GenerateResponse(tool_calls=[CALL])])
    asked = await create(api, input="Weather?", tools=tools, tool_choice="required")
    assert asked["output"] == [rendering.call_item(ToolCall("call_abc", "get_weather", '{"city": "Oslo"}'))]
    assert inference.requests[0].structured.tool_choice == "required"
    await create(api, previous_response_id=asked["id"], tools=tools,
                 input=[{"type": "function_call_output", "call_id": "call_abc", "output": "18 C"}])
    [sid] = session_ids(store)
    assert [(m.role, m.tool_call_id) for m in store.list_messages("alice", sid)] == [
        ("user", ""), ("assistant", ""), ("tool", "call_abc"), ("assistant", "")]
    with pytest.raises(InvalidArgument, match="answers no earlier tool call"):
        await create(api, input=[{"type": "function_call_output", "call_id": "call_zzz", "output": "?"}])


async def test_store_false_and_refused_requests_keep_nothing(api: Responses, store: SqliteSessionStore,
                                                             inference: Inference) -> None:
    served = await create(api, input="Hi", store=False)
    assert served["output"][0]["content"][0]["text"] == "Fine." and session_ids(store) == []
    with pytest.raises(NotFound):
        await api.get(served["id"])
    inference.refuse = Refused()
    with pytest.raises(grpc.aio.AioRpcError):
        await create(api, input="Hi")
    assert session_ids(store) == []


async def test_other_owners_see_nothing_and_a_busy_session_is_409(api: Responses, store: SqliteSessionStore,
                                                                 who: dict[str, Identity]) -> None:
    mine = await create(api, input="Hi")
    [sid] = session_ids(store)
    who["id"] = Identity("bob", "bob", frozenset({"user"}))
    for attempt in (api.get(mine["id"]), api.delete(mine["id"]), api.input_items(mine["id"], 0, "", ""),
                    create(api, input="x", previous_response_id=mine["id"])):
        with pytest.raises(NotFound):
            await attempt
    who["id"] = Identity("alice", "alice", frozenset({"user"}))
    async with api.sessions.hold_turn(sid):
        with pytest.raises(Aborted):
            await create(api, input="x", previous_response_id=mine["id"])
    assert len(store.list_messages("alice", sid)) == 2


async def test_streamed_failure_keeps_the_partial_answer(api: Responses, store: SqliteSessionStore,
                                                         inference: Inference) -> None:
    inference.scripts.append([pb.GenerateResponse(text="Once"), Refused()])
    parts = [part async for part in api.create(json.dumps({"input": "Tell", "stream": True}).encode())]
    assert {kind for kind, _ in parts} == {rendering.SSE}
    events = events_of([data for _, data in parts])
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["message"] == "slow down"
    [sid] = session_ids(store)
    answer = store.list_messages("alice", sid)[-1]
    assert (answer.content, answer.status) == ("Once", "error")
    assert json.loads(await api.get(events[-1]["response"]["id"]))["status"] == "failed"
    # Not streamed, the same failure is the call's status.
    inference.scripts.append([pb.GenerateResponse(text="Once"), Refused()])
    with pytest.raises(ParleyError) as caught:
        await create(api, input="Tell")
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- reasoning -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reasoning, effort", [
    (None, ""), ({"effort": "none"}, "none"), ({"effort": "low", "summary": "auto"}, "low"),
    ({"effort": "xhigh"}, "high"), ({}, ""),
])
def test_reasoning_effort_reaches_the_chat_template_and_is_echoed(reasoning: dict | None, effort: str) -> None:
    req = parse(input="Hi", reasoning=reasoning)
    assert req.structure.template.reasoning_effort == effort
    assert req.echo["reasoning"] == {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")}
    assert structured.to_proto(req.structure).reasoning_effort == effort


@pytest.mark.parametrize("reasoning, words", [
    ("high", "reasoning must be an object"), ({"effort": "extreme"}, "reasoning.effort"),
    ({"summary": "long"}, "reasoning.summary"),
])
def test_a_wrong_reasoning_is_a_400(reasoning: Any, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        parse(input="Hi", reasoning=reasoning)


def test_reasoning_streams_as_its_own_item_before_the_message() -> None:
    import pydantic
    from openai._models import construct_type
    from openai.types.responses import Response, ResponseReasoningItem, ResponseStreamEvent

    usage = pb.Usage(prompt_tokens=12, completion_tokens=9, total_tokens=21, reasoning_tokens=6)
    writer = rendering.EventWriter("resp_m1", "m1", "tiny", {"instructions": None})
    chunks = writer.start() + writer.delta("", [], "Greet") + writer.delta("Hel", [], " back.")
    chunks += writer.delta("lo", [], "late") + writer.finish(pb.FINISH_REASON_STOP, usage)
    events = events_of(chunks)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    for event in events[2:-1]:  # the items' events, as the SDK's types spell them
        assert adapter.validate_python(event).type == event["type"]
    assert [e["output_index"] for e in events if e["type"].endswith(".delta")] == [0, 0, 1, 1]
    final = construct_type(type_=Response, value=events[-1]["response"])  # as the SDK reads it
    thought = final.output[0]
    assert isinstance(thought, ResponseReasoningItem)
    assert (thought.id, thought.summary, [c.text for c in thought.content or []]) == ("rs_m1", [], ["Greet back."])
    assert final.output_text == "Hello"
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 6


def test_an_answer_that_only_thought_has_its_reasoning_and_an_empty_message() -> None:
    writer = rendering.EventWriter("resp_m1", "m1", "tiny", {"instructions": None})
    events = events_of(writer.start() + writer.delta("", [], "Hmm") + writer.finish(pb.FINISH_REASON_LENGTH, USAGE))
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["output"] == [rendering.reasoning_item("rs_m1", "Hmm", "incomplete"),
                                           rendering.message_item("msg_m1", "", "incomplete")]
    assert final["response"]["output"] == rendering.output_items("m1", "", [], "incomplete", "Hmm")  # as GET shows it


async def test_a_stored_response_keeps_its_reasoning_apart_and_never_resends_it(
        api: Responses, store: SqliteSessionStore, inference: Inference) -> None:
    inference.scripts.append([pb.GenerateResponse(reasoning="They greet me."), pb.GenerateResponse(text="Hello!")])
    first = await create(api, input="Hi", reasoning={"effort": "low"})
    assert inference.requests[0].structured.reasoning_effort == "low"
    assert [i["type"] for i in first["output"]] == ["reasoning", "message"]
    assert first["output"][0]["content"] == [{"type": "reasoning_text", "text": "They greet me."}]
    assert first["reasoning"] == {"effort": "low", "summary": None}
    [sid] = session_ids(store)
    answer = store.list_messages("alice", sid)[-1]
    assert (answer.content, answer.reasoning) == ("Hello!", "They greet me.")
    assert json.loads(await api.get(first["id"]))["output"] == first["output"]

    await create(api, input="And?", previous_response_id=first["id"])
    assert [(m.role, m.content) for m in inference.requests[1].messages] == [
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "And?")]
