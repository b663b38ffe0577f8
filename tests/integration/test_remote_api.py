"""Remote models through Envoy: the inference service in front of real llama-servers (the bundled
model) with engine "remote" — OpenAI chat (stream and not), Anthropic's messages, a session turn, the response cache,
cancellation reaching the upstream, an upstream killed mid-answer, a replica killed while its twin
serves, an upstream's 429 passed through (a tiny local server plays that upstream: llama-server
never answers 429), and a request beyond the model's in-flight limit queued in Parley's line."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from services.inference.engines.upstream import UpstreamPool
from services.stack import Stack, free_port
from tests.integration.chat import chat, create_session, iter_events, messages, text_of
from tests.integration.conftest import Caller, new_user, start_stack
from tests.integration.test_observability import Collector, collector  # noqa: F401 - a fixture used below
from tests.llama_server import BUNDLED, EMBEDDINGS, LlamaServer, binary

SHORT = {"temperature": 0, "max_tokens": 8}


class Busy(BaseHTTPRequestHandler):
    """An upstream that lists its model and answers every completion with 429 Retry-After: 7."""

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "busy", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._send(429, {"error": {"message": "too many requests", "type": "rate_limit"}}, {"Retry-After": "7"})

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LlamaServer]]:
    """main: serves most tests (with a chat template that offers tools); twin: main's replica, killed
    in one test; solo: killed mid-answer; embed: serves embeddings."""
    binary()  # skips (or fails under make test) before anything starts when there is no llama-server
    logs = tmp_path_factory.mktemp("llama-server")
    servers = {name: LlamaServer(logs / f"{name}.log", tools=name == "main") for name in ("main", "twin", "solo")}
    servers["embed"] = LlamaServer(logs / "embed.log", context=2048, alias="smol-embed", extra=EMBEDDINGS)
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def busy() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def remote_stack(tmp_path_factory: pytest.TempPathFactory, upstreams: dict[str, LlamaServer],
                 busy: str, collector: tuple[Collector, int]) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("remote-stack")
    params = {"model": "smollm2", "tokenizer": BUNDLED, "timeout_seconds": 30, "health_interval_seconds": 0.5}
    catalogue = [
        {"id": "remote-smol", "engine": "remote", "source": upstreams["main"].url, "params": params},
        {"id": "remote-pair", "engine": "remote", "source": [upstreams["main"].url, upstreams["twin"].url],
         "params": params},
        {"id": "remote-one", "engine": "remote", "source": upstreams["main"].url,
         "params": {**params, "max_in_flight": 1}},
        {"id": "remote-solo", "engine": "remote", "source": upstreams["solo"].url, "params": params},
        {"id": "remote-busy", "engine": "remote", "source": busy, "params": {"model": "busy"}},
        {"id": "remote-embed", "task": "embedding", "engine": "remote", "source": upstreams["embed"].url,
         "params": {"model": "smol-embed", "timeout_seconds": 30}},
        {"id": "remote-embed-gone", "task": "embedding", "engine": "remote",
         "source": f"http://127.0.0.1:{free_port()}/v1", "params": {"model": "smol-embed"}},
    ]
    models_file = Path(data_dir) / "models.json"
    models_file.write_text(json.dumps(catalogue))
    running = start_stack(data_dir, PARLEY_MODELS_FILE=str(models_file), PARLEY_DEFAULT_MODEL="remote-smol",
                          PARLEY_CONTEXT_LENGTH="2048", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector[1]}",
                          OTEL_BSP_SCHEDULE_DELAY="200")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def caller(remote_stack: Stack) -> Caller:
    return new_user(remote_stack.url, "remote")


@pytest.fixture(scope="module")
def http(remote_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=remote_stack.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(remote_stack: Stack, caller: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{remote_stack.url}/v1", api_key=caller.api_key, max_retries=0)


def test_openai_chat_through_a_remote_model(client: openai.OpenAI, upstreams: dict[str, LlamaServer]) -> None:
    question = [{"role": "user", "content": "Say hello."}]
    answer = client.chat.completions.create(model="remote-smol", messages=question, **SHORT)
    assert answer.model == "remote-smol" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 5
    # The same answer straight from the upstream: Parley forwarded the messages and sampling as given.
    direct = httpx.post(f"{upstreams['main'].url}/chat/completions", timeout=60,
                        json={"messages": question, **SHORT}).json()
    assert answer.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert answer.usage.prompt_tokens == direct["usage"]["prompt_tokens"]

    stream = client.chat.completions.create(model="remote-smol", messages=question, stream=True,
                                            stream_options={"include_usage": True}, **SHORT)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_anthropic_messages_through_a_remote_model(remote_stack: Stack, caller: Caller,
                                                   upstreams: dict[str, LlamaServer]) -> None:
    """Anthropic's API on a remote model is translated to the upstream's chat completions: the same
    answer as the upstream gives that chat, whole and streamed."""
    def upstream(question: list[dict[str, str]]) -> dict[str, Any]:
        return httpx.post(f"{upstreams['main'].url}/chat/completions", timeout=60,
                          json={"messages": question, **SHORT}).json()

    claude = anthropic.Anthropic(base_url=remote_stack.url, api_key=caller.api_key, max_retries=0, timeout=60)
    river = [{"role": "user", "content": "Name a river."}]
    message = claude.messages.create(model="remote-smol", max_tokens=8, messages=river, extra_body={"temperature": 0})
    direct = upstream(river)
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == direct["choices"][0]["message"]["content"]
    assert message.usage.input_tokens == direct["usage"]["prompt_tokens"]

    lake = [{"role": "user", "content": "Name a lake."}]
    with claude.messages.stream(model="remote-smol", max_tokens=8, messages=lake,
                                extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    direct = upstream(lake)
    assert text == direct["choices"][0]["message"]["content"]
    assert final.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[direct["choices"][0]["finish_reason"]]


def test_the_upstream_call_is_a_client_span_of_the_request_trace(remote_stack: Stack, caller: Caller,
                                                               collector: tuple[Collector, int],
                                                               upstreams: dict[str, LlamaServer]) -> None:
    trace_id = uuid.uuid4().hex
    answer = httpx.post(f"{remote_stack.url}/v1/chat/completions", timeout=60,
                        headers={"authorization": f"Bearer {caller.api_key}",
                                 "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
                        json={"model": "remote-smol", "messages": [{"role": "user", "content": "Hi"}], **SHORT})
    assert answer.status_code == 200, answer.text
    receiver, _ = collector
    deadline = time.monotonic() + 10
    while not (client := [s for s in receiver.trace(trace_id) if s.kind == 3 and s.name.startswith("POST ")]):
        assert time.monotonic() < deadline, sorted((s.service, s.name) for s in receiver.trace(trace_id))
        time.sleep(0.2)
    assert client[0].name == f"POST {upstreams['main'].url}/chat/completions" and client[0].service == "parley-inference"
    assert client[0].attributes["http.response.status_code"] == 200
    assert client[0].attributes["parley.model"] == "remote-smol"


def test_session_turn_and_cache_hit_on_a_remote_model(http: httpx.Client, caller: Caller) -> None:
    question = f"Name a colour. ({uuid.uuid4().hex[:6]})"
    first, second = (create_session(http, caller, model="remote-smol")["id"] for _ in range(2))
    miss = chat(http, caller, first, question, sampling=SHORT)
    hit = chat(http, caller, second, question, sampling=SHORT)
    assert miss[-1]["done"]["cached"] is False and hit[-1]["done"]["cached"] is True
    assert text_of(hit) == text_of(miss) != ""
    assert messages(http, caller, first)[-1]["content"] == text_of(miss)
    # A second turn carries the history to the upstream.
    again = chat(http, caller, first, "And another one?", sampling=SHORT)
    assert again[-1]["done"]["usage"]["prompt_tokens"] > miss[-1]["done"]["usage"]["prompt_tokens"]


def test_a_client_that_leaves_stops_the_upstream(remote_stack: Stack, caller: Caller,
                                                 upstreams: dict[str, LlamaServer]) -> None:
    main = upstreams["main"]
    body = {"model": "remote-smol", "messages": [{"role": "user", "content": "Write a long story about a ship."}],
            "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=remote_stack.url, timeout=60) as own, own.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {caller.api_key}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break
        assert main.processing() == 1
        left = time.monotonic()
    while main.processing() and time.monotonic() - left < 5:
        time.sleep(0.01)
    stopped = time.monotonic() - left
    assert main.processing() == 0, "the upstream kept generating after the client left"
    assert stopped < 1.0, f"the upstream stopped {stopped:.2f} s after the client left"


def test_an_upstream_killed_mid_answer_ends_the_turn_with_an_error(http: httpx.Client, remote_stack: Stack,
                                                                   caller: Caller, client: openai.OpenAI,
                                                                   upstreams: dict[str, LlamaServer]) -> None:
    sid = create_session(http, caller, model="remote-solo")["id"]
    received, events = "", []
    with http.stream("POST", f"/v1/sessions/{sid}:chat", headers=caller.headers,
                     json={"content": "Write a long story about a castle.", "sampling": {"max_tokens": 400}}) as r:
        assert r.status_code == 200
        for event in iter_events(r):
            events.append(event)
            if "delta" in event:
                received += event["delta"]["text"]
                if len(received) > 20 and upstreams["solo"].process.poll() is None:
                    upstreams["solo"].kill()
    assert "error" in events[-1], events[-1]
    assert "remote-solo" in events[-1]["error"]["message"]
    stored = messages(http, caller, sid)[-1]
    # The partial answer is kept, marked as cut by an error.
    assert stored["status"] == "MESSAGE_STATUS_ERROR" and stored["content"].startswith(received) and received
    # Soon the health check reports the model failed, with its reason; requests get 503 naming it, at once.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        model = client.models.retrieve("remote-solo").model_dump()
        if model.get("state") == "MODEL_STATE_FAILED":
            break
        time.sleep(0.2)
    assert model.get("state") == "MODEL_STATE_FAILED" and upstreams["solo"].url in model.get("error", "")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="remote-solo", messages=[{"role": "user", "content": "Hi"}], **SHORT)
    assert failed.value.status_code == 503 and "remote-solo" in str(failed.value)
    assert time.monotonic() - started < 2


def test_a_replica_killed_leaves_its_twin_serving(client: openai.OpenAI, upstreams: dict[str, LlamaServer]) -> None:
    def ask(i: int) -> str:
        answer = client.chat.completions.create(
            model="remote-pair", messages=[{"role": "user", "content": f"Count to {i}."}], **SHORT)
        return answer.choices[0].message.content or ""

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(ask, range(4)))
    upstreams["twin"].kill()
    # Right away (before a health check notices) and after: every conversation is served by main.
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(ask, range(8)))
    model = client.models.retrieve("remote-pair").model_dump()
    assert model.get("state") == "MODEL_STATE_READY"


def test_an_upstream_429_reaches_the_client_with_its_retry_after(remote_stack: Stack, caller: Caller) -> None:
    answer = httpx.post(f"{remote_stack.url}/v1/chat/completions", timeout=30,
                        headers={"authorization": f"Bearer {caller.api_key}"},
                        json={"model": "remote-busy", "messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 429, answer.text
    assert answer.headers.get("retry-after") == "7"
    assert "remote-busy" in answer.text and "too many requests" in answer.text


def test_openai_embeddings_through_a_remote_model(client: openai.OpenAI, remote_stack: Stack, caller: Caller,
                                                  upstreams: dict[str, LlamaServer]) -> None:
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Interest rates rose again."]
    direct = httpx.post(f"{upstreams['embed'].url}/embeddings", json={"input": texts}, timeout=60).json()
    batch = client.embeddings.create(model="remote-embed", input=texts)
    assert batch.model == "remote-embed" and [d.index for d in batch.data] == [0, 1, 2]
    # The upstream's vectors and its usage, passed through.
    for mine, theirs in zip(batch.data, sorted(direct["data"], key=lambda d: d["index"])):
        assert len(mine.embedding) == 576 and mine.embedding == pytest.approx(theirs["embedding"], abs=1e-6)
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == direct["usage"]["prompt_tokens"] > 10
    single = client.embeddings.create(model="remote-embed", input=texts[2])
    assert single.data[0].embedding == pytest.approx(batch.data[2].embedding, abs=1e-6)
    assert 0 < single.usage.prompt_tokens < batch.usage.prompt_tokens
    # The SDK's default (base64) decodes to the same floats; the model list gives its size.
    packed = httpx.post(f"{remote_stack.url}/v1/embeddings", headers=caller.headers, timeout=60,
                        json={"model": "remote-embed", "input": texts[0], "encoding_format": "base64"}).json()
    assert isinstance(packed["data"][0]["embedding"], str)
    assert client.models.retrieve("remote-embed").model_dump()["dimensions"] == 576
    # The native Embed RPC takes the same path.
    native = httpx.post(f"{remote_stack.url}/v1/models/remote-embed:embed", headers=caller.headers, timeout=60,
                        json={"inputs": [{"text": texts[2]}]})
    assert native.status_code == 200, native.text
    assert native.json()["prompt_tokens"] == single.usage.prompt_tokens
    assert native.json()["embeddings"][0]["values"] == pytest.approx(single.data[0].embedding, abs=1e-6)
    # Refused input is the upstream's 400; dimensions on a model that cannot shorten is Parley's.
    with pytest.raises(openai.BadRequestError, match="remote-embed"):
        client.embeddings.create(model="remote-embed", input=[[99999999]])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="remote-embed", input="x", dimensions=8)


def test_remote_embeddings_with_the_upstream_down_are_503(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as down:
        client.embeddings.create(model="remote-embed-gone", input="hello")
    assert down.value.status_code == 503 and "remote-embed-gone" in str(down.value)
    assert time.monotonic() - started < 10


def test_a_remote_tool_call_streams_in_pieces(client: openai.OpenAI) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    example = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    chat = [{"role": "user", "content": "Weather in Rome?"}, example,
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "Weather in Paris?"}]
    # The 135M model needs the example and a nudge towards "<tool_call>" (4350 is its token "call");
    # llama-server's grammar then writes the call, and streams it as OpenAI's delta.tool_calls.
    stream = client.chat.completions.create(model="remote-smol", messages=chat, tools=[weather],
                                            tool_choice="required", logit_bias={"4350": 10}, stream=True,
                                            temperature=0, max_tokens=40)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    # As from a local model: the id and name first, then the arguments bit by bit, one call (index 0).
    assert len(pieces) > 2, pieces
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert all(p.index == 0 and not p.id for p in pieces[1:])
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == {"city": "Paris"}


def test_a_request_beyond_max_in_flight_waits_in_line_then_is_served(remote_stack: Stack, caller: Caller,
                                                                     http: httpx.Client,
                                                                     upstreams: dict[str, LlamaServer]) -> None:
    sid = create_session(http, caller, model="remote-one")["id"]
    events: list[dict[str, Any]] = []

    def turn() -> None:
        with httpx.Client(base_url=remote_stack.url, timeout=60) as own, own.stream(
                "POST", f"/v1/sessions/{sid}:chat", json={"content": "Hi", "sampling": SHORT},
                headers=caller.headers) as response:
            events.extend(iter_events(response))

    body = {"model": "remote-one", "messages": [{"role": "user", "content": "Write a long story about a ship."}],
            "max_tokens": 400, "stream": True}
    waiter = threading.Thread(target=turn)
    with httpx.Client(base_url=remote_stack.url, timeout=60) as own, own.stream(
            "POST", "/v1/chat/completions", json=body, headers=caller.headers) as holder:
        assert holder.status_code == 200
        lines = holder.iter_lines()
        next(line for line in lines if line.startswith("data: ") and '"content"' in line)
        waiter.start()
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events and events[0].get("queued", {}).get("position") == 1, events[:2]
        # The upstream has two slots and runs one request: Parley holds the turn back, not llama-server.
        assert upstreams["main"].processing() == 1
    waiter.join(60)  # the holder left: its place went to the turn
    assert any("start" in e for e in events) and "done" in events[-1], events[-2:]
    assert text_of(events) != ""


def test_a_llama_server_says_how_many_requests_it_runs_at_once(upstreams: dict[str, LlamaServer]) -> None:
    async def told() -> int | None:
        pool = UpstreamPool("main", upstreams["main"].url, {"model": "smollm2"})
        await pool.open()
        try:
            return await pool.parallel(pool.upstreams[0])
        finally:
            await pool.close()

    assert asyncio.run(told()) == 2  # its -np: the in-flight limit of a model without params.max_in_flight
