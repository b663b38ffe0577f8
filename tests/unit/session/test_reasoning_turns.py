"""A reasoning model's thinking in a chat turn, with a scripted inference: it streams as
`delta.reasoning` apart from the text, is stored apart from the answer's content (a cut answer keeps
its partial reasoning), comes back with the message, and is never sent to the model again."""

from __future__ import annotations

import json

from parley.inference.v1 import inference_pb2 as pb
from parley.session.v1 import session_pb2

from services.session.conversation import converse_event
from services.session.service import SessionService
from services.session.servicer import message_pb
from services.session.store import SqlSessionStore
from services.session.websocket import event_json
from tests.unit.session.test_tool_turns import Inference, inference, service, store, turn  # noqa: F401 - fixtures

USAGE = pb.Usage(prompt_tokens=30, completion_tokens=12, total_tokens=42, reasoning_tokens=8)


def thought_then_answered(inference: Inference) -> None:
    inference.scripts.append([pb.GenerateResponse(reasoning="The user greets."),
                              pb.GenerateResponse(reasoning=" Greet back."),
                              pb.GenerateResponse(text="Hello!"),
                              pb.GenerateResponse(finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])


async def test_reasoning_streams_and_is_stored_apart_and_never_resent(service: SessionService,
                                                                     store: SqlSessionStore,
                                                                     inference: Inference) -> None:
    sid = store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
    thought_then_answered(inference)
    events = await turn(service, sid, "Hi")
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert [(d.reasoning, d.text) for d in deltas] == [("The user greets.", ""), (" Greet back.", ""), ("", "Hello!")]
    assert events[-1].done.usage.reasoning_tokens == 8

    answer = store.list_messages("alice", sid)[-1]
    assert (answer.content, answer.reasoning, answer.reasoning_tokens, answer.status) == (
        "Hello!", "The user greets. Greet back.", 8, "complete")
    shown = message_pb(answer)
    assert (shown.content, shown.reasoning, shown.reasoning_tokens) == ("Hello!", "The user greets. Greet back.", 8)

    inference.scripts.append([pb.GenerateResponse(text="Fine.", finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])
    await turn(service, sid, "How are you?")
    sent = inference.requests[1].messages
    assert [(m.role, m.content) for m in sent] == [("user", "Hi"), ("assistant", "Hello!"), ("user", "How are you?")]
    assert not any("Greet back" in m.content for m in sent)


async def test_an_answer_that_only_thought_keeps_it_and_sends_nothing_next_turn(
        service: SessionService, store: SqlSessionStore, inference: Inference) -> None:
    """A small max_tokens can end an answer inside its thinking: the content is empty, the reasoning
    kept; the next turn sends no empty assistant message."""
    sid = store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
    inference.scripts.append([pb.GenerateResponse(reasoning="Hmm, let me"),
                              pb.GenerateResponse(reasoning=" think", finish_reason=pb.FINISH_REASON_LENGTH,
                                                  usage=USAGE)])
    await turn(service, sid, "Hi")
    answer = store.list_messages("alice", sid)[-1]
    assert (answer.content, answer.reasoning) == ("", "Hmm, let me think")
    inference.scripts.append([pb.GenerateResponse(text="Hello.", finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])
    await turn(service, sid, "Hello?")
    assert [(m.role, m.content) for m in inference.requests[1].messages] == [("user", "Hi"), ("user", "Hello?")]


async def test_a_turn_cut_short_keeps_its_partial_reasoning(service: SessionService, store: SqlSessionStore,
                                                            inference: Inference) -> None:
    sid = store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
    thought_then_answered(inference)
    stream = service.chat(session_pb2.ChatRequest(session_id=sid, content="Hi"))
    got = [await anext(stream), await anext(stream)]  # start, then the first thought
    assert got[1].delta.reasoning == "The user greets."
    await stream.aclose()
    answer = store.list_messages("alice", sid)[-1]
    assert (answer.content, answer.reasoning, answer.status) == ("", "The user greets.", "incomplete")
    assert answer.completion_tokens == 1


async def test_thinking_can_be_turned_off_for_a_turn(service: SessionService, store: SqlSessionStore,
                                                     inference: Inference) -> None:
    sid = store.create_session("alice", title="", model="", system_prompt="", sampling={}).id
    inference.scripts.append([pb.GenerateResponse(text="Hi.", finish_reason=pb.FINISH_REASON_STOP, usage=USAGE)])
    await turn(service, sid, "Hi", structured=pb.StructuredOutput(
        reasoning_effort="none", chat_template_kwargs='{"enable_thinking": false}'))
    sent = inference.requests[0].structured
    assert (sent.reasoning_effort, sent.chat_template_kwargs) == ("none", '{"enable_thinking":false}')


def test_the_websocket_says_reasoning_in_its_own_field() -> None:
    event = converse_event(session_pb2.ChatResponse(delta=session_pb2.ChatDelta(reasoning="Thinking.")))
    assert json.loads(event_json(event)) == {"type": "delta", "text": "", "reasoning": "Thinking.", "tool_calls": []}
