"""The remote engine's own logic in-process: the catalogue entry, what it sends upstream, balancing with
session affinity, failover and error mapping. httpx.MockTransport plays the upstreams here; the real
ones (llama-server through Envoy) are in tests/integration/test_remote_api.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from services.core import config
from services.core.config import ConfigError
from services.core.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.core.structured import Tool, make_structure, make_template_options
from services.inference.endpoints.embeddings import EmbeddingService
from services.inference.engines.remote import RemoteEngine
from services.inference.engines.remote_embedding import PROBE, RemoteEmbeddingEngine
from services.inference.engines.remote_wire import Chat, request_body
from services.inference.engines.sequence import Sampling
from services.inference.engines.upstream import UpstreamPool
from services.inference.flow.service import Admitted, GenerationService, SamplingInput
from services.inference.models.hardware import probe
from services.inference.models.registry import ModelRegistry, load_catalogue
from services.inference.settings import InferenceSettings

A, B = "http://a.test/v1", "http://b.test/v1"


def settings_with(tmp_path: Path, entries: list[dict]) -> InferenceSettings:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(entries))
    return config.load(InferenceSettings, {"PARLEY_MODELS_FILE": str(path), "PARLEY_DEFAULT_MODEL": entries[0]["id"],
                                           "PARLEY_CONTEXT_LENGTH": "1024"})


def sse(*events: dict, done: bool = True) -> bytes:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


def answer(text: str = "Hello there", usage: dict | None = None, done: bool = True) -> bytes:
    words = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
             for w in re.findall(r"\S+\s*", text)]
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    tail = [{"choices": [], "usage": usage}] if usage else []
    return sse(*words, end, *tail, done=done)


class Upstreams:
    """Mock upstreams by host: what each answers, and the requests each received."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.drop_once: set[str] = set()  # hosts that close the next request's connection unanswered
        self.reply: dict[str, httpx.Response] = {}
        self.seen: list[tuple[str, dict]] = []
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if host in self.drop_once and not request.url.path.endswith("/models"):
            self.drop_once.discard(host)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "up-model", "max_model_len": 512}]})
        if request.url.path == "/props":  # not a llama-server: the in-flight limit is the default
            return httpx.Response(404)
        self.seen.append((host, json.loads(request.content)))
        self.paths.append(request.url.path)
        reply = self.reply.get(host)
        if reply is not None and not (request.url.path.endswith("/embeddings") and self.seen[-1][1]["input"] == [PROBE]):
            return reply
        if request.url.path.endswith("/embeddings"):
            given = self.seen[-1][1]["input"]
            # Vectors of length 1 whose direction tells the input: [len, 1, 0, 0] normalised.
            rows = [[float(len(i)), 1.0, 0.0, 0.0] for i in given]
            rows = [[x / sum(v * v for v in row) ** 0.5 for x in row] for row in rows]
            data = [{"object": "embedding", "index": i, "embedding": row} for i, row in reversed(list(enumerate(rows)))]
            return httpx.Response(200, json={"object": "list", "data": data, "model": "up-model",
                                             "usage": {"prompt_tokens": 3 * len(given), "total_tokens": 3 * len(given)}})
        if request.url.path.endswith("/v1/completions"):
            return httpx.Response(200, content=sse({"choices": [{"index": 0, "text": " Paris.", "finish_reason": None}]},
                                                   {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
        return httpx.Response(200, content=answer(usage={"prompt_tokens": 9, "completion_tokens": 2}),
                              headers={"content-type": "text/event-stream"})


@pytest.fixture
def upstreams(monkeypatch: pytest.MonkeyPatch) -> Upstreams:
    mock = Upstreams()
    monkeypatch.setattr(UpstreamPool, "transport", httpx.MockTransport(mock))
    return mock


def remote_registry(tmp_path: Path, sources: list[str], **params: object) -> tuple[ModelRegistry, GenerationService]:
    settings = settings_with(tmp_path, [{"id": "far", "engine": "remote", "source": sources,
                                         "params": {"model": "up-model", "health_interval_seconds": 60, **params}}])
    registry = ModelRegistry(settings, probe())
    return registry, GenerationService(registry, settings)


async def run(generation: GenerationService, content: str = "Hi", **given: object) -> tuple[Admitted, str, list]:
    items = [item async for item in generation.generate("far", [{"role": "user", "content": content}], "",
                                                        SamplingInput(**given))]
    admitted, chunks = items[0], items[1:]
    return admitted, "".join(c.text for c in chunks), chunks


def test_catalogue_takes_remote_models_and_refuses_what_cannot_work(tmp_path: Path) -> None:
    entries = load_catalogue(settings_with(tmp_path, [
        {"id": "far", "engine": "remote", "source": [A, B], "params": {"model": "m", "timeout_seconds": 30}}]))
    assert entries["far"].source == f"{A},{B}" and entries["far"].fingerprint() == "remote:m-0"
    for bad, message in (({"source": "/models/x.gguf"}, "base URL"),
                         ({"source": A, "params": {"timeout_seconds": 0}}, "timeout_seconds"),
                         ({"source": A, "engine": "llama.cpp", "task": "embedding"}, "embedding")):
        with pytest.raises(ConfigError, match=message):
            load_catalogue(settings_with(tmp_path, [{"id": "far", "engine": "remote", **bad}]))


async def test_the_request_forwards_sampling_and_structure(tmp_path: Path, upstreams: Upstreams) -> None:
    registry, generation = remote_registry(tmp_path, [A])
    admitted, text, chunks = await run(generation, temperature=0.2, top_p=0.9, seed=7, max_tokens=20,
                                       stop=["END"], repetition_penalty=1.1)
    assert text == "Hello there" and chunks[-1].finish_reason == "stop"
    # The upstream's usage is what counts; nothing was counted here before it ran (it would delay the call).
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 2)
    assert admitted.prompt_tokens == 0
    body = upstreams.seen[-1][1]
    assert body["model"] == "up-model" and body["messages"] == [{"role": "user", "content": "Hi"}]
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"], body["stop"]) == (0.2, 0.9, 7, 20, ["END"])
    assert body["repetition_penalty"] == 1.1 and body["stream"] is True
    engine = registry.records["far"].engine
    assert isinstance(engine, RemoteEngine) and engine.context_length == 512  # capped by the upstream's max_model_len
    tool = Tool("get_weather", "", json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}))
    structure = make_structure([tool], "function", "get_weather")
    sent = request_body(engine.remote_model, Chat([{"role": "user", "content": "x"}], structure=structure), Sampling())
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["tools"][0]["function"]["parameters"]["properties"]["city"] == {"type": "string"}
    schema = make_structure([], format="json_schema", schema=json.dumps({"type": "object"}))
    sent = request_body(engine.remote_model, Chat([], "x", schema), Sampling())
    assert sent["response_format"]["json_schema"]["schema"] == {"type": "object"}
    await registry.close()


async def test_a_raw_prompt_goes_to_the_legacy_completions_endpoint(tmp_path: Path, upstreams: Upstreams) -> None:
    registry, generation = remote_registry(tmp_path, [A])
    items = [i async for i in generation.generate("far", [], "The capital of France is", SamplingInput(max_tokens=3))]
    assert "".join(i.text for i in items[1:]) == " Paris." and items[-1].finish_reason == "length"
    assert upstreams.paths[-1] == "/v1/completions" and upstreams.seen[-1][1]["prompt"] == "The capital of France is"
    assert items[-1].usage.completion_tokens == 2  # counted here: the upstream sent no usage
    await registry.close()


async def test_usage_is_counted_when_the_upstream_sends_none(tmp_path: Path, upstreams: Upstreams) -> None:
    upstreams.reply["a.test"] = httpx.Response(200, content=answer("one two three four"))
    registry, generation = remote_registry(tmp_path, [A])
    _, text, chunks = await run(generation)
    assert text == "one two three four" and chunks[-1].usage.completion_tokens == 5  # 18 bytes at 4 a token
    assert chunks[-1].usage.prompt_tokens == 2  # "user\nHi\n", 8 bytes, counted after the answer
    await registry.close()


async def test_upstream_errors_map_to_parley_codes(tmp_path: Path, upstreams: Upstreams) -> None:
    registry, generation = remote_registry(tmp_path, [A])
    upstreams.reply["a.test"] = httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"retry-after": "7"})
    with pytest.raises(ResourceExhausted, match="slow down") as busy:
        await run(generation)
    assert busy.value.retry_after == 7
    upstreams.reply["a.test"] = httpx.Response(400, json={"error": {"message": "bad stop"}})
    with pytest.raises(InvalidArgument, match="bad stop"):
        await run(generation)
    upstreams.reply["a.test"] = httpx.Response(502, text="bad gateway")
    with pytest.raises(Unavailable, match="'far'.*502"):
        await run(generation)
    # A stream cut before its end is an error after what came before it.
    upstreams.reply["a.test"] = httpx.Response(200, content=sse(
        {"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}, done=False))
    received = []
    with pytest.raises(Unavailable, match="ended the answer early"):
        async for item in generation.generate("far", [{"role": "user", "content": "Hi"}], "", SamplingInput()):
            received.append(item)
    assert received[-1].text == "partial"
    assert registry.records["far"].engine.upstreams[0].outstanding == 0
    await registry.close()


async def test_least_outstanding_with_affinity_and_failover(tmp_path: Path, upstreams: Upstreams) -> None:
    registry, generation = remote_registry(tmp_path, [A, B])
    await registry.load("far")
    engine = registry.records["far"].engine
    assert isinstance(engine, RemoteEngine)
    a, b = engine.upstreams
    # Least outstanding requests: a busy upstream gets the next new conversation's opposite.
    a.outstanding = 3
    assert engine._pick("conversation-1", set()) is b
    a.outstanding, b.outstanding = 0, 5
    assert engine._pick("conversation-2", set()) is a
    # A conversation sticks to its upstream however busy it is, while that one is healthy.
    assert engine._pick("conversation-1", set()) is b
    # Whole turns: the same opening messages land on the same upstream.
    b.outstanding = 0
    for _ in range(3):
        await run(generation, "Same opening")
    assert len({host for host, _ in upstreams.seen}) == 1
    # An upstream that refuses connections is skipped at once, marked failed, and its twin serves.
    first = upstreams.seen[-1][0]
    upstreams.down.add(first)
    _, text, _ = await run(generation, "Same opening")
    assert text == "Hello there" and upstreams.seen[-1][0] != first
    failed = a if first == "a.test" else b
    assert not failed.healthy and "ConnectError" in failed.reason
    assert registry.records["far"].status() == ("ready", "")
    # Both down: failed with the reasons, and requests are refused at once.
    upstreams.down.update({"a.test", "b.test"})
    await engine.check()
    state, reason = registry.records["far"].status()
    assert state == "failed" and A in reason and B in reason
    started = time.monotonic()
    with pytest.raises(Unavailable, match="'far'"):
        await run(generation)
    assert time.monotonic() - started < 1
    # A health check that succeeds brings them back.
    upstreams.down.clear()
    await engine.check()
    assert registry.records["far"].status() == ("ready", "")
    await registry.close()


async def test_no_upstream_at_load_fails_the_model_with_the_reason(tmp_path: Path, upstreams: Upstreams) -> None:
    upstreams.down.add("a.test")
    registry, generation = remote_registry(tmp_path, [A])
    with pytest.raises(Unavailable, match="far.*a.test"):
        await run(generation)
    assert registry.records["far"].state == "failed" and "a.test" in registry.records["far"].error
    upstreams.down.clear()
    _, text, _ = await run(generation)  # the next request loads it again
    assert text == "Hello there"
    await registry.close()


async def test_a_missing_api_key_variable_is_named(tmp_path: Path, upstreams: Upstreams,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAR_KEY", raising=False)
    registry, generation = remote_registry(tmp_path, [A], api_key_env="FAR_KEY")
    with pytest.raises(Unavailable, match="FAR_KEY"):
        await run(generation)
    monkeypatch.setenv("FAR_KEY", "s3cret")
    await run(generation)
    await registry.close()


def remote_embedder(tmp_path: Path, sources: list[str], **params: object) -> tuple[ModelRegistry, EmbeddingService]:
    settings = settings_with(tmp_path, [
        {"id": "chat", "engine": "remote", "source": A, "params": {"model": "up-model"}},
        {"id": "far-embed", "task": "embedding", "engine": "remote", "source": sources,
         "params": {"model": "up-model", "health_interval_seconds": 60, **params}}])
    registry = ModelRegistry(settings, probe())
    return registry, EmbeddingService(registry, settings, cache=None)


async def test_remote_embeddings_pass_the_inputs_through(tmp_path: Path, upstreams: Upstreams) -> None:
    registry, embedder = remote_embedder(tmp_path, [A, B], matryoshka=True)
    result = await embedder.embed("far-embed", ["one", "three"])
    # The upstream's vectors in input order (it answered them reversed) and its usage.
    assert result.vectors.shape == (2, 4) and result.vectors[0][0] < result.vectors[1][0]
    assert result.prompt_tokens == 6 and result.tokens == [0, 0]
    host, body = upstreams.seen[-1]
    assert upstreams.paths[-1] == "/v1/embeddings" and body == {"model": "up-model", "input": ["one", "three"],
                                                                  "encoding_format": "float"}
    engine = registry.records["far-embed"].engine
    assert isinstance(engine, RemoteEmbeddingEngine) and (engine.dimensions, engine.normalized) == (4, True)
    # Token arrays travel as they are; dimensions shortens here (and renormalises), as for local models.
    short = await embedder.embed("far-embed", [[1, 2, 3]], dimensions=2)
    assert upstreams.seen[-1][1]["input"] == [[1, 2, 3]] and short.vectors.shape == (1, 2)
    assert abs(float((short.vectors[0] ** 2).sum()) - 1) < 1e-6
    with pytest.raises(InvalidArgument, match="not both"):
        await embedder.embed("far-embed", ["text", [1, 2]])
    with pytest.raises(InvalidArgument, match="truncate"):
        await embedder.embed("far-embed", ["text"], truncate=True)
    # A replica that refuses connections is skipped.
    upstreams.down.add(host)
    again = await embedder.embed("far-embed", ["one"])
    assert upstreams.seen[-1][0] != host and again.vectors.shape == (1, 4)
    await registry.close()


async def test_remote_embedding_errors_map_to_parley_codes(tmp_path: Path, upstreams: Upstreams) -> None:
    registry, embedder = remote_embedder(tmp_path, [A])
    upstreams.reply["a.test"] = httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"retry-after": "3"})
    with pytest.raises(ResourceExhausted, match="slow down") as busy:
        await embedder.embed("far-embed", ["x"])
    assert busy.value.retry_after == 3
    upstreams.reply["a.test"] = httpx.Response(400, json={"error": {"message": "Prompt contains invalid tokens"}})
    with pytest.raises(InvalidArgument, match="'far-embed' refused.*invalid tokens"):
        await embedder.embed("far-embed", [[99999999]])
    upstreams.reply["a.test"] = httpx.Response(500, json={"error": {"message": "boom"}})
    with pytest.raises(Unavailable, match="'far-embed'.*500.*boom"):
        await embedder.embed("far-embed", ["x"])
    upstreams.reply["a.test"] = httpx.Response(200, json={"data": [{"index": 0, "embedding": "not floats"}]})
    with pytest.raises(Unavailable, match="'far-embed'.*malformed"):
        await embedder.embed("far-embed", ["x"])
    assert registry.records["far-embed"].engine.upstreams[0].outstanding == 0
    # Unreachable: 503 naming the model, and once the health check notices, the model is failed.
    upstreams.down.add("a.test")
    with pytest.raises(Unavailable, match="'far-embed'"):
        await embedder.embed("far-embed", ["x"])
    await registry.records["far-embed"].engine.check()
    state, reason = registry.records["far-embed"].status()
    assert state == "failed" and "a.test" in reason
    await registry.close()


async def test_tool_calls_stream_as_call_deltas(tmp_path: Path, upstreams: Upstreams) -> None:
    def piece(index: int, arguments: str, name: str = "", id: str = "") -> dict:
        call = {"index": index, "function": {"arguments": arguments, **({"name": name} if name else {})},
                **({"id": id, "type": "function"} if id else {})}
        return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}

    # Two calls: the first with the upstream's id, the second (index 3 upstream) with none.
    upstreams.reply["a.test"] = httpx.Response(200, content=sse(
        piece(0, '{"ci', name="get_weather", id="call_up"), piece(0, 'ty": "Paris"}'),
        piece(3, "", name="get_time"), piece(3, "{}"),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    registry, generation = remote_registry(tmp_path, [A])
    _, text, chunks = await run(generation)
    deltas = [d for c in chunks for d in c.call_deltas]
    assert text == "" and [(d.index, d.id, d.name, d.arguments) for d in deltas] == [
        (0, "call_up", "get_weather", '{"ci'), (0, "", "", 'ty": "Paris"}'),
        (1, deltas[2].id, "get_time", ""), (1, "", "", "{}")]
    assert deltas[2].id.startswith("call_")
    # The finished calls carry the streamed ids (the OpenAI layer sends each call once).
    finished = chunks[-1].tool_calls
    assert [(c.id, c.name, c.arguments) for c in finished] == [
        ("call_up", "get_weather", '{"city": "Paris"}'), (deltas[2].id, "get_time", "{}")]
    assert chunks[-1].finish_reason == "tool_calls"
    await registry.close()


async def test_a_kept_alive_connection_closed_under_a_request_is_retried(tmp_path: Path, upstreams: Upstreams) -> None:
    registry, generation = remote_registry(tmp_path, [A])
    await run(generation)
    upstreams.drop_once.add("a.test")
    _, text, _ = await run(generation)
    assert text == "Hello there" and registry.records["far"].status() == ("ready", "")
    assert registry.records["far"].engine.upstreams[0].outstanding == 0
    await registry.close()


async def test_an_upstreams_reasoning_passes_through_and_template_options_are_forwarded(
        tmp_path: Path, upstreams: Upstreams) -> None:
    thinking = [{"choices": [{"index": 0, "delta": {"reasoning_content": w}, "finish_reason": None}]}
                for w in ("Let me ", "think.")]
    vllm_style = {"choices": [{"index": 0, "delta": {"reasoning": " More."}, "finish_reason": None}]}
    words = [{"choices": [{"index": 0, "delta": {"content": "Paris."}, "finish_reason": None}]},
             {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
             {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6,
                                       "completion_tokens_details": {"reasoning_tokens": 4}}}]
    upstreams.reply["a.test"] = httpx.Response(200, content=sse(*thinking, vllm_style, *words))
    registry, generation = remote_registry(tmp_path, [A])
    structure = make_structure([], template=make_template_options({"enable_thinking": True, "style": "x"}, "low"))
    items = [i async for i in generation.generate("far", [{"role": "user", "content": "Capital?"}], "",
                                                  SamplingInput(), structure=structure)]
    chunks = items[1:]
    assert "".join(c.reasoning for c in chunks) == "Let me think. More."
    assert "".join(c.text for c in chunks) == "Paris." and chunks[-1].usage.reasoning_tokens == 4
    body = upstreams.seen[-1][1]
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "style": "x"} and body["reasoning_effort"] == "low"
    await registry.close()
