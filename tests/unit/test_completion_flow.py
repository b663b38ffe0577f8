"""The one completion flow, fast: the session turn and the OpenAI path over the real generation
service, metered flow and Generate RPC (a real gRPC server in this process), with a scripted engine
(tests/fake_engine.py) and an in-memory cache. The same behaviours run against the real model in the
integration tests; here each takes milliseconds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from parley.cache.v1 import cache_pb2
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc
from parley.session.v1 import session_pb2

from services.core import config
from services.core.errors import QuotaExceeded, ResourceExhausted
from services.core.identity import Identity
from services.core.server import Registration, ServiceSpec, start_server
from services.inference.endpoints.chat_completions import ChatCompletions
from services.inference.flow.metered import MeteredCompletions
from services.inference.flow.service import GenerationService
from services.inference.models.hardware import probe
from services.inference.models.registry import ModelRegistry
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from services.session.service import SessionService
from services.session.settings import SessionSettings
from services.session.store import SqliteSessionStore
from tests.fake_engine import Script, ScriptedEngine, scripted_engines

CONTEXT = 200


class MemoryCache:
    """The cache client's interface, in memory: lookups and stores, a rate limit and the usage."""

    def __init__(self) -> None:
        self.entries: dict[bytes, cache_pb2.CachedCompletion] = {}
        self.limited = False
        self.quota_used_up = False
        self.used: list[int] = []  # tokens of generated answers
        self.replayed: list[int] = []  # tokens of answers replayed from the cache

    @staticmethod
    def _key(key: cache_pb2.CompletionKey) -> bytes:
        return key.SerializeToString(deterministic=True)

    async def lookup(self, key: cache_pb2.CompletionKey) -> cache_pb2.CachedCompletion | None:
        return self.entries.get(self._key(key))

    async def store(self, key: cache_pb2.CompletionKey, completion: cache_pb2.CachedCompletion) -> bool:
        self.entries[self._key(key)] = completion
        return True

    async def check_rate_limit(self) -> None:
        if self.limited:
            raise ResourceExhausted("rate limit exceeded: 60 requests per minute", retry_after=7)
        if self.quota_used_up:
            raise QuotaExceeded("token budget of 10 tokens per day (UTC) is used up", retry_after=3600)

    async def record_usage(self, model: str, prompt_tokens: int, completion_tokens: int, *,
                           cached_prompt_tokens: int = 0, cached: bool = False) -> None:
        assert model
        (self.replayed if cached else self.used).append(prompt_tokens + completion_tokens)


class Counting:
    """The session's inference stub, counting the calls a turn makes."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub) -> None:
        self.stub = stub
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.stub, name)


@dataclass
class Flow:
    session: SessionService
    store: SqliteSessionStore
    cache: MemoryCache
    inference: Counting
    metered: MeteredCompletions
    engines: list[ScriptedEngine]

    @property
    def engine(self) -> ScriptedEngine:
        return self.engines[0]

    def new_session(self, system_prompt: str = "", **sampling: Any) -> str:
        return self.store.create_session("alice", title="", model="", system_prompt=system_prompt, sampling=sampling).id

    async def turn(self, session_id: str, content: str, **fields: Any) -> list[session_pb2.ChatResponse]:
        request = session_pb2.ChatRequest(session_id=session_id, content=content, **fields)
        return [event async for event in self.session.chat(request)]

    async def settled(self) -> None:
        await self.metered.close()  # the background bookkeeping

    def stored(self, session_id: str) -> list[tuple[str, str, str]]:
        return [(m.role, m.content, m.status) for m in self.store.list_messages("alice", session_id)]


@pytest.fixture
async def flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Flow]:
    engines = scripted_engines(monkeypatch)
    settings = config.load(InferenceSettings, {"PARLEY_CONTEXT_LENGTH": str(CONTEXT), "PARLEY_PARALLEL_SLOTS": "1",
                                               "PARLEY_MAX_TOKENS": "20"})
    registry = ModelRegistry(settings, probe())
    await registry.load(settings.default_model)  # flow.engine exists from the start
    generation = GenerationService(registry, settings)
    cache = MemoryCache()
    metered = MeteredCompletions(generation, registry, cache)  # type: ignore[arg-type]
    servicer = InferenceServicer(registry, generation, probe(), metered=metered)
    name = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
    server = await start_server(ServiceSpec("inference", [Registration(
        name, inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer)]))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    store = SqliteSessionStore(tmp_path / "session.db")
    alice = Identity("alice", "alice", frozenset({"user"}))
    monkeypatch.setattr("services.session.service.current_identity", lambda: alice)
    stub = Counting(inference_pb2_grpc.InferenceServiceStub(channel))
    session = SessionService(store, SessionSettings(answer_reserve_tokens=20, checkpoint_seconds=0.1,
                                                    inference_timeout_seconds=5), stub)  # type: ignore[arg-type]
    try:
        yield Flow(session, store, cache, stub, metered, engines)
    finally:
        await channel.close()
        await server.stop(None)
        await registry.close()
        store.close()


def texts(events: list[session_pb2.ChatResponse]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def test_a_turn_is_one_round_trip_and_both_messages_are_stored(flow: Flow) -> None:
    sid = flow.new_session("Be brief.")
    events = await flow.turn(sid, "Hi there")
    assert flow.inference.calls == ["Generate"]
    start, done = events[0].start, events[-1].done
    assert start.model and start.dropped_messages == 0 and start.assistant_message_id
    assert texts(events) == " Hello there." and done.finish_reason == pb.FINISH_REASON_STOP and not done.cached
    assert flow.stored(sid) == [("user", "Hi there", "complete"), ("assistant", " Hello there.", "complete")]
    await flow.turn(sid, "And again")
    # The second prompt is the whole conversation.
    assert len(flow.engine.requests[1].prompt) == 1 + 3 + 3 + 3 + 3 + 1  # BOS, four lines, the answer's cue
    await flow.settled()
    assert flow.cache.used == [r.usage.total_tokens for r in flow.engine.requests]


async def test_a_long_conversation_leaves_out_its_oldest_turns_and_says_how_many(flow: Flow) -> None:
    sid = flow.new_session("Be brief.")
    flow_words = " ".join(["word"] * 30)
    dropped = []
    for _ in range(8):
        events = await flow.turn(sid, flow_words)
        dropped.append(events[0].start.dropped_messages)
    assert dropped[0] == 0 and dropped[-1] > 0 and dropped == sorted(dropped)
    prompt = flow.engine.requests[-1].prompt
    assert len(prompt) <= CONTEXT - 20  # room for the answer (answer_reserve_tokens)
    # Kept: the system prompt, then whole turns from a question on, then the new question.
    words = [flow.engine._ids.get(t) for t in prompt[1:]]
    assert words[:3] == ["<system>", "Be", "brief."] and words[3] == "<user>"
    assert len(flow.stored(sid)) == 16  # everything stays stored


async def test_a_message_too_long_even_alone_is_a_400_and_nothing_is_stored(flow: Flow) -> None:
    sid = flow.new_session()
    await flow.turn(sid, "Hi")
    before = flow.stored(sid)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await flow.turn(sid, " ".join(["word"] * CONTEXT))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"needs {CONTEXT + 3} tokens" in refused.value.details() and "only 180 of" in refused.value.details()
    assert flow.stored(sid) == before


@pytest.mark.parametrize("why", ["rate limit", "token budget", "full engine"])
async def test_a_refused_turn_stores_nothing(flow: Flow, why: str) -> None:
    sid = flow.new_session()
    await flow.turn(sid, "Hi")
    before = flow.stored(sid)
    if why == "rate limit":
        flow.cache.limited = True
    elif why == "token budget":
        flow.cache.quota_used_up = True
    else:
        flow.engine.capacity = 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await flow.turn(sid, "Hello?")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(refused.value.trailing_metadata() or ())
    assert trailers.get("retry-after") == {"rate limit": "7", "token budget": "3600"}.get(why, "1")
    # The budget's refusal is told apart (the gateway's insufficient_quota), through inference and session.
    assert trailers.get("parley-reason") == ("insufficient_quota" if why == "token budget" else None)
    assert flow.stored(sid) == before
    flow.cache.limited, flow.cache.quota_used_up, flow.engine.capacity = False, False, 4
    assert (await flow.turn(sid, "Again"))[-1].HasField("done")  # no 409: the refused turn let the session go


async def test_a_client_that_leaves_keeps_what_it_got_and_the_engine_stops(flow: Flow) -> None:
    sid = flow.new_session()
    await flow.turn(sid, "Hi")
    flow.engine.script = Script(words=[f"w{i}" for i in range(100)], delay=0.01)
    stream = flow.session.chat(session_pb2.ChatRequest(session_id=sid, content="Tell me a story"))
    got = [await anext(stream) for _ in range(4)]  # start and three pieces
    await stream.aclose()
    assert texts(got) == " w0 w1 w2"
    assert flow.stored(sid)[-1] == ("assistant", " w0 w1 w2", "incomplete")
    request = flow.engine.requests[-1]
    for _ in range(50):  # the cancellation reaches the engine through gRPC
        if request.cancelled and not flow.engine.running:
            break
        await asyncio.sleep(0.01)
    assert request.cancelled and flow.engine.running == 0 and request.usage.completion_tokens < 20
    await flow.settled()
    assert len(flow.cache.used) == 2  # the abandoned answer's tokens are recorded too


async def test_the_partial_answer_is_saved_while_it_streams(flow: Flow) -> None:
    sid = flow.new_session()
    flow.engine.script = Script(words=[f"w{i}" for i in range(15)], delay=0.03)
    stream = flow.session.chat(session_pb2.ChatRequest(session_id=sid, content="Go"))
    got = [await anext(stream) for _ in range(10)]
    role, content, status = flow.stored(sid)[-1]
    assert role == "assistant" and status == "incomplete" and content and texts(got).startswith(content)
    async for _ in stream:
        pass
    assert flow.stored(sid)[-1][2] == "complete"


async def test_an_engine_error_after_the_first_words_keeps_them_with_the_error(flow: Flow) -> None:
    sid = flow.new_session()
    await flow.turn(sid, "Hi")
    flow.engine.script = Script(words=["one", "two", "three"], fail_after=2)
    events = await flow.turn(sid, "Count")
    assert texts(events) == " one two" and events[-1].error.code == "INTERNAL"
    messages = flow.store.list_messages("alice", sid)
    assert (messages[-1].content, messages[-1].status) == (" one two", "error") and messages[-1].error


async def test_the_deadline_ends_the_answer_as_cancelled_and_keeps_it(flow: Flow) -> None:
    sid = flow.new_session()
    flow.session.settings = SessionSettings(inference_timeout_seconds=1)
    flow.engine.script = Script(words=[], delay=0.1, end=False)
    events = await flow.turn(sid, "Never stop")
    assert events[-1].done.finish_reason == pb.FINISH_REASON_CANCELLED
    assert flow.stored(sid)[-1][2] == "incomplete" and texts(events).startswith(" more")


async def test_a_deterministic_turn_is_replayed_from_the_cache(flow: Flow) -> None:
    greedy = pb.SamplingParams(temperature=0)
    first, second = flow.new_session(), flow.new_session()
    generated = await flow.turn(first, "Hi", sampling=greedy)
    await flow.settled()
    replayed = await flow.turn(second, "Hi", sampling=greedy)
    assert len(flow.engine.requests) == 1 and replayed[0].HasField("start") and replayed[-1].done.cached
    assert texts(replayed) == texts(generated)
    assert replayed[-1].done.usage.completion_tokens == generated[-1].done.usage.completion_tokens == 2
    assert flow.stored(second)[-1] == ("assistant", " Hello there.", "complete")
    await flow.settled()
    assert len(flow.cache.used) == 1 and flow.cache.replayed == flow.cache.used  # recorded apart


async def test_a_cached_call_is_replayed_under_a_new_id(flow: Flow) -> None:
    greedy = pb.SamplingParams(temperature=0)
    weather = pb.StructuredOutput(tools=[pb.Tool(name="get_weather", parameters='{"type": "object"}')],
                                  tool_choice="required", parallel_tool_calls=False)
    first, second = flow.new_session(), flow.new_session()
    flow.engine.script = Script(words=['<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>'])
    generated = await flow.turn(first, "Weather in Oslo?", sampling=greedy, structured=weather)
    await flow.settled()
    [call] = [c for e in generated if e.HasField("delta") for c in e.delta.tool_calls]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    events = await flow.turn(second, "Weather in Oslo?", sampling=greedy, structured=weather)
    [again] = [c for e in events if e.HasField("delta") for c in e.delta.tool_calls]
    assert events[-1].done.cached and events[-1].done.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert (again.name, again.arguments) == (call.name, call.arguments) and again.id != call.id


def skeleton(parts: list[tuple[str, bytes]]) -> list[Any]:
    """An SSE stream's shape: each event's delta keys and finish reason, consecutive text merged."""
    shape: list[Any] = []
    for _, data in parts:
        body = data.decode().removeprefix("data: ").strip()
        if body == "[DONE]":
            shape.append("[DONE]")
            continue
        event = json.loads(body)
        choice = (event["choices"] or [{}])[0]
        item = (tuple(sorted(choice.get("delta", {}))), choice.get("finish_reason"), "usage" in event and
                event["usage"] is not None)
        if not (shape and shape[-1] == item and item[0] == ("content",)):
            shape.append(item)
    return shape


@pytest.mark.parametrize("stream", [False, True])
async def test_an_openai_answer_from_the_cache_has_the_generated_shape(flow: Flow, stream: bool) -> None:
    chat = ChatCompletions(flow.metered)
    body = json.dumps({"model": "", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
                       "stream": stream, "stream_options": {"include_usage": True} if stream else None}).encode()
    marks: list[str] = []

    async def mark(value: str) -> None:
        marks.append(value)

    generated = [part async for part in chat.create(body, None, mark)]
    await flow.settled()
    replayed = [part async for part in chat.create(body, None, mark)]
    assert marks == ["miss", "hit"] and len(flow.engine.requests) == 1
    if stream:
        assert skeleton(replayed) == skeleton(generated)
        return
    first, again = (json.loads(parts[0][1]) for parts in (generated, replayed))
    for answer in (first, again):
        answer.pop("id"), answer.pop("created")
    assert again["usage"].pop("prompt_tokens_details") != first["usage"].pop("prompt_tokens_details")
    assert again == first


async def test_counting_tokens_is_within_the_rate_limit(flow: Flow) -> None:
    total, per_message, context = await flow.metered.count_tokens("", [{"role": "user", "content": "one two"}])
    assert total == 1 + 3 + 1 and context == CONTEXT
    flow.cache.limited = True
    with pytest.raises(ResourceExhausted):
        await flow.metered.count_tokens("", [{"role": "user", "content": "one two"}])


async def test_a_chats_reasoning_is_apart_and_a_raw_prompts_text_is_as_written(flow: Flow) -> None:
    """A template whose generation prompt opens a <think> block: a chat's answer up to </think> is
    reasoning (message.reasoning_content, reasoning_tokens, cached with it), a raw prompt's is text."""
    from services.inference.models.chat_template import ChatTemplate
    from services.inference.endpoints.text_completions import TextCompletions

    await flow.metered.count_tokens("", [{"role": "user", "content": "load"}])  # loads the engine
    flow.engine.chat_template = ChatTemplate("{{ messages[0].content }}{% if add_generation_prompt %}<think>\n{% endif %}")
    flow.engine.script = Script(words=["Let", "me", "see.", "</think>", "Paris."])

    async def mark(value: str) -> None:
        pass

    chat = ChatCompletions(flow.metered)
    body = json.dumps({"model": "", "messages": [{"role": "user", "content": "Capital?"}], "temperature": 0}).encode()
    for _ in range(2):  # generated, then replayed from the cache
        [(_, data)] = [part async for part in chat.create(body, None, mark)]
        await flow.settled()
        answer = json.loads(data)
        message = answer["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("Let me see.", "Paris.")
        assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
    assert len(flow.engine.requests) == 1
    text = TextCompletions(flow.metered)
    raw = json.dumps({"model": "", "prompt": "Capital?", "temperature": 0.5}).encode()
    [(_, data)] = [part async for part in text.create(raw, None, mark)]
    assert json.loads(data)["choices"][0]["text"] == " Let me see. </think> Paris."
