"""The OpenAI Responses API over saved conversations.

A stored response is a turn of one of the caller's sessions: its input items are stored as the
turn's messages, its answer as the assistant message whose id the response id carries
("resp_" + message id), and its request (instructions, tools, format, sampling, metadata) beside it
(store.start_response). So a chain of responses is a conversation the web app lists and shows, and
the answer of any turn — one made in the web app too — can be continued by id.

`previous_response_id`:
- the latest answer of its session: the new turn is appended to that session;
- an older one: the session is forked — a new session holds the history up to that response, then
  the new turn — and the original stays as it was.
`store: false` keeps nothing (the answer is still served; such an id can be neither read nor
continued). Another user's response is NOT_FOUND, exactly like one that never existed.

The answer itself is SessionService.generate, the flow of every turn: one round trip to inference's
metered Generate (rate limit, response cache, history fit), storage only once inference says
`start` (a refused request stores nothing), the answer saved however the stream ends, and the
session id as the affinity key, so a chain stays on the inference replica that holds its KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from parley.inference.v1 import inference_pb2
from parley.session.v1 import session_pb2

from services.core import structured
from services.core.errors import ParleyError
from services.core.identity import current_identity
from services.session import history
from services.wire import openai_response_events as rendering
from services.wire import openai_responses as wire
from services.session.rules import check_sampling, merge_sampling, sampling_from_dict
from services.session.service import Generation, SessionService, compose, turn_of
from services.session.records import (
    ROLE_ASSISTANT, ROLE_TOOL, STATUS_COMPLETE, STATUS_ERROR, MessageRecord, SessionDraft, StoredResponse,
    TurnMessages,
)

FINISH_NAMES = {v: k for k, v in inference_pb2.FinishReason.items()}


def _error(code: str, message: str) -> ParleyError:
    """A failure reported inside the answer's stream, raised as the status it names."""
    error = ParleyError(message)
    error.code = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNAVAILABLE)
    return error


class Responses:
    def __init__(self, sessions: SessionService) -> None:
        self.sessions = sessions
        self.store = sessions.store
        self.settings = sessions.settings
        # Stored responses this replica is answering now (GET says in_progress).
        self._streaming: set[str] = set()

    # POST /v1/responses

    async def create(self, body: bytes) -> AsyncIterator[tuple[str, bytes]]:
        """Yields (content type, bytes): one JSON Response, or the event stream."""
        who = current_identity()
        req = wire.parse_request(body)
        for i, turn in enumerate(req.inputs):
            self.sessions.check_text(f"input[{i}]", turn.content, self.settings.max_message_chars)
        self.sessions.check_text("instructions", req.system, self.settings.max_system_prompt_chars)
        previous = None
        if req.previous_response_id:
            previous = await asyncio.to_thread(self.store.get_response, who.user_id,
                                               wire.message_id_of(req.previous_response_id))
        async with contextlib.AsyncExitStack() as held:
            past: list[MessageRecord] = []
            append = False
            if previous is not None:
                past = await asyncio.to_thread(self.store.list_messages, who.user_id, previous.session.id)
                if req.store and past and past[-1].id == previous.message.id:
                    # Continuing the latest answer: this turn is the session's next, one at a time.
                    await held.enter_async_context(self.sessions.hold_turn(previous.session.id))
                    past = await asyncio.to_thread(self.store.list_messages, who.user_id, previous.session.id)
                    append = past[-1].id == previous.message.id
                past = [m for m in past if m.seq <= previous.message.seq]
            session = previous.session if previous else None
            system = req.system or (session.system_prompt if session else "")
            messages, keep_last = compose(system, [turn_of(m) for m in past], req.inputs)
            params = merge_sampling(sampling_from_dict(session.sampling) if session else inference_pb2.SamplingParams(),
                                    req.sampling)
            check_sampling(params)
            new_id = uuid.uuid4().hex  # the new session's, when this response starts one
            target = session.id if append and session else new_id
            # The session that holds the conversation routes it: the chain's next turns go where its
            # KV cache is. (A fork's first turn shares the original's prefix.)
            affinity = session.id if session else new_id
            request = req.echo

            def store(start: inference_pb2.GenerateStart) -> TurnMessages | None:
                if not req.store:
                    return None
                if append:
                    return self.store.start_response(who.user_id, target, req.inputs, start.model, request)
                title = session.title if session else history.title_from(req.first_user_text())
                draft = SessionDraft(
                    id=new_id, title=title[: self.settings.max_title_chars], model=session.model if session else req.model,
                    system_prompt=session.system_prompt if session else req.system, sampling=session.sampling if session else {},
                    source=session.id if session else "", through_seq=previous.message.seq if previous else 0)
                return self.store.start_response(who.user_id, "", req.inputs, start.model, request, draft=draft)

            generation = Generation(req.model or (session.model if session else ""), messages, keep_last, params,
                                    structured.to_proto(req.structure), affinity)
            async with contextlib.aclosing(self._render(req, self.sessions.generate(who, generation, store))) as out:
                async for part in out:
                    yield part

    async def _render(self, req: wire.ResponseRequest,
                      events: AsyncIterator[session_pb2.ChatResponse]) -> AsyncIterator[tuple[str, bytes]]:
        writer: rendering.EventWriter | None = None
        async with contextlib.aclosing(events) as stream:
            try:
                async for event in stream:
                    kind = event.WhichOneof("event")
                    if kind == "start":
                        message_id = event.start.assistant_message_id or uuid.uuid4().hex
                        if event.start.assistant_message_id:
                            self._streaming.add(message_id)
                        writer = rendering.EventWriter(wire.ID_PREFIX + message_id, message_id, event.start.model, req.echo)
                        if req.stream:  # the first message fixes the HTTP content type
                            for part in writer.start():
                                yield rendering.SSE, part
                        continue
                    assert writer is not None
                    if kind == "delta":
                        parts = writer.delta(event.delta.text, structured.calls_from_proto(event.delta.tool_calls),
                                             event.delta.reasoning)
                    elif kind == "done":
                        parts = writer.finish(event.done.finish_reason, event.done.usage)
                        if req.store:
                            await asyncio.to_thread(self.store.finish_response, writer.message_id,
                                                    FINISH_NAMES.get(event.done.finish_reason, ""))
                    else:
                        if not req.stream:  # one JSON answer: the status says it (the partial answer is kept)
                            raise _error(event.error.code, event.error.message)
                        parts = writer.fail(event.error.message)
                    if req.stream:
                        for part in parts:
                            yield rendering.SSE, part
            finally:
                if writer is not None:
                    self._streaming.discard(writer.message_id)
        if writer is not None and writer.final is not None and not req.stream:
            yield rendering.JSON, rendering.json_bytes(writer.final)

    # GET, DELETE and input items

    async def get(self, response_id: str) -> bytes:
        found = await asyncio.to_thread(self.store.get_response, current_identity().user_id,
                                        wire.message_id_of(response_id))
        return rendering.json_bytes(self._response_json(found))

    def _response_json(self, found: StoredResponse) -> dict[str, Any]:
        m = found.message
        echo = dict(found.request) if found.request is not None else {"instructions": found.session.system_prompt or None}
        finish = inference_pb2.FinishReason.Value(found.finish_reason) if found.finish_reason else 0
        if m.status == STATUS_ERROR:
            status = "failed"
        elif m.status == STATUS_COMPLETE:
            status = rendering.STATUS_OF_FINISH.get(finish, "completed")
        elif m.id in self._streaming:
            status = "in_progress"
        else:
            status = "incomplete"
        usage = inference_pb2.Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens,
                                     reasoning_tokens=m.reasoning_tokens)
        return rendering.response_json(
            wire.ID_PREFIX + m.id, created_at=m.created_at, model=m.model, status=status, echo=echo,
            output=rendering.output_items(m.id, m.content, m.tool_calls, "completed" if status == "completed" else "incomplete",
                                     m.reasoning),
            usage=usage, error=rendering.server_error(m.error) if status == "failed" else None,
            incomplete_reason=rendering.incomplete_reason(finish))

    async def delete(self, response_id: str) -> bytes:
        who = current_identity()
        message_id = wire.message_id_of(response_id)
        found = await asyncio.to_thread(self.store.get_response, who.user_id, message_id)
        async with self.sessions.hold_turn(found.session.id):  # not while its session is answering
            await asyncio.to_thread(self.store.delete_response, who.user_id, message_id)
        return rendering.json_bytes({"id": response_id, "object": "response", "deleted": True})

    async def input_items(self, response_id: str, limit: int, order: str, after: str) -> bytes:
        inputs = await asyncio.to_thread(self.store.response_inputs, current_identity().user_id,
                                         wire.message_id_of(response_id))
        return rendering.json_bytes(rendering.item_list_json(input_items_json(inputs), limit, order, after))


def input_items_json(messages: list[MessageRecord]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for m in messages:
        if m.role == ROLE_TOOL:
            items.append({"id": f"fco_{m.id}", "type": "function_call_output", "call_id": m.tool_call_id,
                          "output": m.content, "status": "completed"})
            continue
        if m.content or not m.tool_calls:
            items.append(rendering.message_item(f"msg_{m.id}", m.content, "completed", role=m.role))
        if m.role == ROLE_ASSISTANT:
            items += [rendering.call_item(c) for c in m.tool_calls]
    return items
