"""Conversations and the chat turn: the session service's behaviour, apart from gRPC translation.

A turn (the main data path, drawn in docs/architecture.md) is one round trip to inference: check
ownership and input, send the conversation (system prompt, history, the new turn) to Generate, which
checks the rate limit, resolves the model, leaves out the oldest turns that do not fit its context
window, and answers from the response cache or admits the generation (services.inference.flow.metered).
Only once inference says `start` are the tool results, the user's message and an empty assistant
message stored, in one transaction: a turn refused for any reason stores nothing. The assistant
message is saved when the stream ends, however it ends: complete; incomplete with the partial text
when the client goes away; error with the partial text when inference fails. While it streams, the
partial text is saved every few seconds, so even a crash of this service keeps most of it.

A reasoning model's thinking streams as `delta.reasoning`, apart from the text, and is stored apart
from the assistant message's content (partial reasoning too): it is shown, never sent back — later
turns send each answer's content only. A turn's `structured` may turn thinking off
(`reasoning_effort` "none", or `chat_template_kwargs` {"enable_thinking": false}).

Tool turns follow OpenAI's shape: a turn's tools and response format (ChatRequest.structured) go to
inference and into the cache key; the answer's tool calls are streamed and stored with the assistant
message; the next turn answers them with tool_results, stored as tool messages.

The Responses API (services/session/responses.py) answers through the same generate(): one flow for
every answer, whatever shape its caller speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from parley.inference.v1 import inference_pb2, inference_pb2_grpc
from parley.session.v1 import session_pb2

from services.core import structured
from services.core.errors import InvalidArgument, ParleyError, Unavailable, status_of
from services.core.identity import Identity, current_identity, forward_credentials
from services.core.structured import Answer
from services.session import history
from services.session.records import (
    ROLE_ASSISTANT, ROLE_TOOL, ROLE_USER, STATUS_COMPLETE, STATUS_ERROR, STATUS_INCOMPLETE, MessageRecord,
    SessionCursor, SessionRecord, SessionStore, TurnMessages,
)
from services.session.rules import (
    REPLACED_FIELDS, SAMPLING_FIELDS, check_sampling, decode_cursor, encode_cursor, merge_sampling, sampling_from_dict,
    sampling_to_dict,
)
from services.session.settings import SessionSettings
from services.session.turns import TurnLeases

log = logging.getLogger("parley.session")

# Inference routes a conversation's turns to the replica (and slot) that holds its KV cache by this
# header (Envoy's ring hash in Kubernetes; the slot pool's prefix affinity in-process).
AFFINITY_HEADER = "x-parley-session-id"
CONTROL_TIMEOUT_SECONDS = 30.0


def turn_of(record: MessageRecord) -> history.Turn:
    return history.Turn(record.role, record.content, record.tool_calls, record.tool_call_id)


def sent(turn: history.Turn) -> bool:
    """Whether a stored message goes to the model: an empty answer (one that failed before its first
    token) says nothing, but an answer that only called tools does, and so does every tool result."""
    return bool(turn.content or turn.tool_calls or turn.role == ROLE_TOOL)


def compose(system_prompt: str, past: Sequence[history.Turn],
            new: Sequence[history.Turn]) -> tuple[list[inference_pb2.ChatMessage], int]:
    """The messages to send — the system prompt, the stored history, the new turn — and how many of
    the newest must be kept when inference fits them to the context window. Tool results that open
    the new turn answer calls of the latest answer, and stay together with it."""
    turns = [history.Turn("system", system_prompt)] if system_prompt else []
    sendable = [t for t in history.consistent(past) if sent(t)]
    turns += history.newest(sendable, structured.MAX_MESSAGES - len(turns) - max(1, len(new)))
    keep_last = len(new)
    answers = [i for i, t in enumerate(turns) if t.role == ROLE_ASSISTANT]
    if new and new[0].role == ROLE_TOOL and answers:
        keep_last += len(turns) - answers[-1]
    chat = [t.message() for t in [*turns, *new]]
    structured.validate_messages(chat)
    return [structured.message_to_proto(m) for m in chat], keep_last


@dataclass(frozen=True)
class Generation:
    """What one answer asks of inference."""

    model: str
    messages: list[inference_pb2.ChatMessage]
    keep_last: int
    sampling: inference_pb2.SamplingParams
    structure: inference_pb2.StructuredOutput
    # The x-parley-session-id value: the session, so a conversation stays on the replica (and slot)
    # that holds its KV cache.
    affinity: str
    # Pass on where the answer waits for room in the engine (`queued` events before `start`).
    report_queue: bool = False


def delta_of(said: Answer, response: inference_pb2.GenerateResponse) -> session_pb2.ChatDelta | None:
    """Takes one piece of inference's stream into what the answer has said; the delta to pass on, if it
    says anything."""
    if not said.add(response.text, response.reasoning, structured.calls_from_proto(response.tool_calls)):
        return None
    return session_pb2.ChatDelta(text=response.text, reasoning=response.reasoning, tool_calls=response.tool_calls)


def saved(said: Answer, **fields: Any) -> dict[str, Any]:
    """store.save_answer's arguments: what was said so far, and `fields` (status, usage…)."""
    return {"content": said.text, "reasoning": said.reasoning, "tool_calls": said.calls, **fields}


class SessionService:
    def __init__(self, store: SessionStore, settings: SessionSettings,
                 inference: inference_pb2_grpc.InferenceServiceStub) -> None:
        self.store = store
        self.settings = settings
        self.inference = inference
        # One turn at a time per session, across replicas (a lease in the store; see turns.py).
        self._turns = TurnLeases(store, settings.turn_lease_seconds)

    # Checks shared by create, update and chat

    def _page_size(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument("page_size must not be negative")
        return min(requested or self.settings.default_page_size, self.settings.max_page_size)

    def check_text(self, name: str, value: str, limit: int) -> None:
        if len(value) > limit:
            raise InvalidArgument(f"{name} is {len(value)} characters; the limit is {limit}")

    async def _check_model(self, model: str, who: Identity) -> None:
        if not model:
            return
        try:
            await self.inference.GetModel(inference_pb2.GetModelRequest(id=model), metadata=forward_credentials(who),
                                          timeout=CONTROL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise InvalidArgument(f"unknown model {model!r}; GET /v1/models lists the available models") from None
            raise

    async def _check_fields(self, fields: Mapping[str, Any], who: Identity) -> None:
        if "title" in fields:
            self.check_text("title", fields["title"], self.settings.max_title_chars)
        if "system_prompt" in fields:
            self.check_text("system_prompt", fields["system_prompt"], self.settings.max_system_prompt_chars)
        if "sampling" in fields:
            check_sampling(sampling_from_dict(fields["sampling"]))
        if "model" in fields:
            await self._check_model(fields["model"], who)

    # Sessions

    async def create_session(self, given: session_pb2.Session) -> SessionRecord:
        who = current_identity()
        fields = {"title": given.title.strip(), "model": given.model, "system_prompt": given.system_prompt,
                  "sampling": sampling_to_dict(given.sampling)}
        await self._check_fields(fields, who)
        return await asyncio.to_thread(self.store.create_session, who.user_id, **fields)

    async def get_session(self, session_id: str) -> SessionRecord:
        return await asyncio.to_thread(self.store.get_session, current_identity().user_id, session_id)

    async def list_sessions(self, page_size: int, page_token: str) -> tuple[list[SessionRecord], str]:
        limit = self._page_size(page_size)
        after = SessionCursor(*decode_cursor(page_token, "s")) if page_token else None
        rows = await asyncio.to_thread(self.store.list_sessions, current_identity().user_id, limit + 1, after)
        if len(rows) <= limit:
            return rows, ""
        last = rows[limit - 1]
        return rows[:limit], encode_cursor("s", last.updated_at, last.id)

    async def update_session(self, given: session_pb2.Session, paths: Sequence[str]) -> SessionRecord:
        """Applies `paths` of `given` (every non-empty field when `paths` is empty)."""
        who = current_identity()
        current = await asyncio.to_thread(self.store.get_session, who.user_id, given.id)
        if not paths:
            paths = [name for name in ("title", "model", "system_prompt") if getattr(given, name)]
            paths += [f"sampling.{d.name}" for d, _ in given.sampling.ListFields()]
        changes: dict[str, Any] = {}
        sampling = sampling_from_dict(current.sampling)
        for path in paths:
            head, _, rest = path.partition(".")
            if head in ("title", "model", "system_prompt") and not rest:
                changes[head] = getattr(given, head).strip() if head == "title" else getattr(given, head)
            elif head == "sampling" and not rest:
                sampling.CopyFrom(given.sampling)
                changes["sampling"] = None
            elif head == "sampling" and rest in SAMPLING_FIELDS:
                if rest in REPLACED_FIELDS:
                    sampling.ClearField(rest)
                    getattr(sampling, rest).MergeFrom(getattr(given.sampling, rest))
                elif given.sampling.HasField(rest):
                    setattr(sampling, rest, getattr(given.sampling, rest))
                else:
                    sampling.ClearField(rest)
                changes["sampling"] = None
            else:
                raise InvalidArgument(f"update_mask path {path!r} cannot be changed; use title, model, "
                                      "system_prompt, sampling or sampling.<field>")
        if "sampling" in changes:
            changes["sampling"] = sampling_to_dict(sampling)
        if not changes:
            return current
        await self._check_fields(changes, who)
        return await asyncio.to_thread(self.store.update_session, who.user_id, given.id, changes)

    async def delete_session(self, session_id: str) -> None:
        await asyncio.to_thread(self.store.delete_session, current_identity().user_id, session_id)

    async def list_messages(self, session_id: str, page_size: int, page_token: str) -> tuple[list[MessageRecord], str]:
        limit = self._page_size(page_size)
        after = int(decode_cursor(page_token, "m")[0]) if page_token else 0
        rows = await asyncio.to_thread(self.store.list_messages, current_identity().user_id, session_id, limit + 1, after)
        if len(rows) <= limit:
            return rows, ""
        return rows[:limit], encode_cursor("m", rows[limit - 1].seq)

    # The chat turn

    async def chat(self, request: session_pb2.ChatRequest) -> AsyncIterator[session_pb2.ChatResponse]:
        who = current_identity()
        if not request.content.strip() and not request.tool_results:
            raise InvalidArgument("content must not be empty (unless the turn gives tool_results)")
        self.check_text("content", request.content, self.settings.max_message_chars)
        for i, result in enumerate(request.tool_results):
            self.check_text(f"tool_results[{i}].content", result.content, self.settings.max_message_chars)
        session = await asyncio.to_thread(self.store.get_session, who.user_id, request.session_id)
        async with self.hold_turn(session.id):
            # Closing this stream closes the turn's own at once (not when it is garbage), so the
            # answer is saved before the next turn may start.
            async with contextlib.aclosing(self._turn(who, session, request)) as events:
                async for event in events:
                    yield event

    def hold_turn(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """One turn at a time per session — a chat turn or a stored response — across replicas:
        Aborted (409) while another runs (services/session/turns.py)."""
        return self._turns.hold(session_id)

    async def _turn(self, who: Identity, session: SessionRecord,
                    request: session_pb2.ChatRequest) -> AsyncIterator[session_pb2.ChatResponse]:
        params = merge_sampling(sampling_from_dict(session.sampling), request.sampling)
        check_sampling(params)
        # Checked (and schemas made canonical) before anything is stored.
        structure = structured.to_proto(structured.from_proto(request.structured))
        content = request.content if request.content.strip() else ""
        results = [(r.tool_call_id, r.content) for r in request.tool_results]
        past = [turn_of(m) for m in await asyncio.to_thread(self.store.list_messages, session.owner, session.id)]
        history.check_tool_results(past, [call_id for call_id, _ in results])
        new = [history.Turn(ROLE_TOOL, text, tool_call_id=call_id) for call_id, text in results]
        new += [history.Turn(ROLE_USER, content)] if content else []
        messages, keep_last = compose(session.system_prompt, past, new)

        def store(start: inference_pb2.GenerateStart) -> TurnMessages:
            return self.store.start_turn(who.user_id, session.id, content, start.model,
                                         history.title_from(content)[: self.settings.max_title_chars],
                                         tool_results=results)

        generation = Generation(request.model or session.model, messages, keep_last, params, structure, session.id,
                                report_queue=True)
        async with contextlib.aclosing(self.generate(who, generation, store)) as events:
            async for event in events:
                yield event

    async def generate(self, who: Identity, generation: Generation,
                       store: Callable[[inference_pb2.GenerateStart], TurnMessages | None],
                       ) -> AsyncIterator[session_pb2.ChatResponse]:
        """One answer: the turn's one round trip to inference, with `store` run (in a thread) once
        inference says `start`; then the answer's events, saved into the stored assistant message
        however the stream ends. `store` returning None keeps nothing (a Responses `store: false`).

        Inference checks the rate limit, resolves the model, fits the history to its context window,
        answers from the response cache or admits the generation, and only then says `start`. An
        error before it (unknown model, too long, rate limited, no room) is this call's status, and
        nothing is stored. Events: queued… (with `report_queue`, while the answer waits for room in
        the engine), start, delta…, then done or error. An error after a queued event is an error
        event: the caller's stream has begun."""
        metadata = (*forward_credentials(who), (AFFINITY_HEADER, generation.affinity))
        call = self.inference.Generate(
            inference_pb2.GenerateRequest(
                model=generation.model, messages=generation.messages, sampling=generation.sampling,
                structured=generation.structure,
                fit=inference_pb2.HistoryFit(keep_last=generation.keep_last,
                                             reserve_tokens=self.settings.answer_reserve_tokens),
                report_queue=generation.report_queue),
            metadata=metadata, timeout=self.settings.inference_timeout_seconds)
        queued = False
        try:
            while (first := await call.read()) is not grpc.aio.EOF and first.HasField("queued"):
                queued = True
                yield session_pb2.ChatResponse(queued=session_pb2.ChatQueued(
                    position=first.queued.position, estimated_wait_ms=first.queued.estimated_wait_ms))
            if first is grpc.aio.EOF or not first.HasField("start"):
                raise Unavailable("inference ended the answer before it started; try again")
            start = first.start
            stored = await asyncio.to_thread(store, start)
        except (grpc.aio.AioRpcError, ParleyError) as exc:
            call.cancel()
            if not queued:
                raise
            code, message = status_of(exc)
            yield session_pb2.ChatResponse(error=session_pb2.ChatError(code=code.name, message=message))
            return
        except BaseException:
            call.cancel()
            raise
        yield session_pb2.ChatResponse(start=session_pb2.ChatStart(
            user_message_id=stored.user.id if stored and stored.user else "",
            assistant_message_id=stored.answer.id if stored else "",
            model=start.model, tool_message_ids=[m.id for m in stored.tools] if stored else [],
            dropped_messages=start.dropped_messages))
        answer = stored.answer if stored else None
        async with contextlib.aclosing(self._answer(answer, call, start.cached, generation.affinity)) as events:
            async for event in events:
                yield event

    def _save(self, answer: MessageRecord | None, **fields: Any) -> None:
        if answer is not None:
            self.store.save_answer(answer.id, **fields)

    async def _answer(self, answer: MessageRecord | None, call: grpc.aio.UnaryStreamCall, cached: bool,
                      session_id: str) -> AsyncIterator[session_pb2.ChatResponse]:
        """Streams the answer after `start` and saves it however it ends (nothing without `answer`).
        Reasoning streams and is saved apart from the text; a cut answer keeps both."""
        said = Answer()
        last: inference_pb2.GenerateResponse | None = None
        checkpoint = time.monotonic()
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                if (delta := delta_of(said, response)) is not None:
                    yield session_pb2.ChatResponse(delta=delta)
                if response.HasField("usage"):
                    last = response
                if time.monotonic() - checkpoint >= self.settings.checkpoint_seconds:
                    await asyncio.to_thread(self._save, answer, **saved(said, status=STATUS_INCOMPLETE))
                    checkpoint = time.monotonic()
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: cancelled while waiting for inference, or closed while this
            # waited at a `yield`. Cancelling the call ends the generation (inference records what
            # it used). Save synchronously: an await here could be cancelled again.
            call.cancel()
            self._save(answer, **saved(said, status=STATUS_INCOMPLETE, completion_tokens=said.pieces))
            raise
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or exc.code().name
            log.warning("generation failed", extra={"fields": {"code": code.name, "session_id": session_id}})
            await asyncio.to_thread(self._save, answer, **saved(said, 
                status=STATUS_ERROR, completion_tokens=said.pieces, error=f"{code.name}: {details}"))
            yield session_pb2.ChatResponse(error=session_pb2.ChatError(code=code.name, message=details))
            return
        if last is None:
            # A stream that ended without its final message: keep what arrived, as incomplete.
            await asyncio.to_thread(self._save, answer, **saved(said, status=STATUS_INCOMPLETE,
                                                                     completion_tokens=said.pieces))
            yield session_pb2.ChatResponse(error=session_pb2.ChatError(code="UNAVAILABLE",
                                                                       message="the answer ended unexpectedly"))
            return
        # A cancelled answer is incomplete; one that ended with tool calls is complete like any other.
        status = STATUS_INCOMPLETE if last.finish_reason == inference_pb2.FINISH_REASON_CANCELLED else STATUS_COMPLETE
        usage = last.usage
        await asyncio.to_thread(self._save, answer, **saved(said, 
            status=status, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens))
        yield session_pb2.ChatResponse(done=session_pb2.ChatDone(usage=usage, finish_reason=last.finish_reason,
                                                                 cached=cached))
