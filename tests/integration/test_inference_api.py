"""The inference service through Envoy with the real bundled model: the official openai SDK,
OpenAI's error shape, the native Generate stream, queue-full, cancellation and context overflow."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc

from services.stack import Stack
from tests.integration.conftest import Caller

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def client(base_url: str, user: Caller) -> openai.OpenAI:
    # An API key as the SDK's api_key, exactly as an OpenAI user would configure it.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=user.api_key, max_retries=0)


def test_openai_sdk_lists_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    assert client.models.retrieve(MODEL).id == MODEL


def test_openai_sdk_non_streaming_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=16, temperature=0,
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_openai_sdk_streaming_completion_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text.strip()
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streaming_is_incremental_and_ends_with_done(base_url: str, user: Caller) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 60, "stream": True, "temperature": 0}
    arrivals = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60, headers=user.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    assert arrivals[-2][1] != "[DONE]" and json.loads(arrivals[-2][1])["choices"][0]["finish_reason"] is not None
    assert len(arrivals) > 20
    assert arrivals[-1][0] - arrivals[0][0] > 0.1  # ~60 tokens came over time, not in one burst


def test_stop_sequences_as_string_or_list(client: openai.OpenAI) -> None:
    for stop in ("3", ["3", "three"]):
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 5 with digits, comma separated."}],
            max_tokens=40, temperature=0, stop=stop,
        )
        assert "3" not in completion.choices[0].message.content


def test_seeded_sampling_is_repeatable(client: openai.OpenAI) -> None:
    def ask() -> str:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write a word."}], max_tokens=10,
            temperature=1.0, seed=1234,
        ).choices[0].message.content

    assert ask() == ask()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n must be between"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}, 400,
         "token id"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 1}}, 400,
         "vocabulary"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, 400,
         "presence_penalty"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop"),
    ],
)
def test_errors_come_back_in_openai_shape(base_url: str, user: Caller, body: dict, status: int, words: str) -> None:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30, headers=user.headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_a_body_too_large_is_413_in_openai_shape(base_url: str, user: Caller) -> None:
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 3 * 2**20}]})
    answer = httpx.post(f"{base_url}/v1/chat/completions", content=huge, timeout=60,
                        headers={**user.headers, "content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "invalid_request_error" and "larger" in answer.json()["error"]["message"]


def test_invalid_json_body_is_400(base_url: str, user: Caller) -> None:
    response = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json", **user.headers})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_openai_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n must be between"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=50)


def test_n_choices_and_logprobs_with_the_sdk(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write one word."}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=6, temperature=1.2,
                                            seed=11, logprobs=True, top_logprobs=2)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for choice in answer.choices:
        tokens = choice.logprobs.content
        assert tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
        assert "".join(t.token for t in tokens).startswith(choice.message.content[:3])
    assert answer.usage.completion_tokens == sum(len(c.logprobs.content) for c in answer.choices) or \
        answer.usage.completion_tokens >= 3
    streamed: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6, stream=True,
                                                temperature=1.0):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(streamed.values())


def test_penalties_and_logit_bias_change_the_answer_and_the_cache_key(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Repeat the word 'apple' five times."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    first_token = plain.choices[0].message.content
    biased = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            logit_bias={"2": -100}, frequency_penalty=2.0)
    assert biased.choices[0].message.content != first_token  # not the cached answer of the plain request


def test_prompt_longer_than_context_is_400_with_both_counts(base_url: str, user: Caller) -> None:
    long = "word " * 3000  # the shared stack runs a 2048-token context
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]},
                          headers=user.headers)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "2048" in message and "context window" in message
    prompt_tokens = int(message.split("the prompt is ")[1].split(" tokens")[0])
    assert prompt_tokens > 2048


def test_native_generate_stream_over_grpc(stack: Stack, user: Caller) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.common.port_of('inference')}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(
            model=MODEL, messages=[pb.ChatMessage(role="user", content="Say hello")],
            sampling=pb.SamplingParams(max_tokens=8, temperature=0),
        )
        replies = list(stub.Generate(request, timeout=60, metadata=user.metadata))
    assert replies[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert replies[-1].usage.completion_tokens == (8 if replies[-1].finish_reason == pb.FINISH_REASON_LENGTH else replies[-1].usage.completion_tokens)
    assert replies[-1].usage.time_to_first_token_ms > 0
    assert "".join(r.text for r in replies).strip()


def test_native_generate_sse_through_envoy(base_url: str, user: Caller) -> None:
    events = []
    with httpx.stream("POST", f"{base_url}/v1/models/{MODEL}:generate", headers=user.headers,
                      json={"messages": [{"role": "user", "content": "Hi"}], "sampling": {"max_tokens": 5}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
    assert events[-1]["usage"]["completion_tokens"] >= 1


def test_bad_sampling_parameter_over_grpc_is_invalid_argument(stack: Stack, user: Caller) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.common.port_of('inference')}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(model=MODEL, prompt="x", sampling=pb.SamplingParams(top_p=1.5))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=30, metadata=user.metadata))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p" in info.value.details()


async def _long_stream(base_url: str, user: Caller, results: list, max_tokens: int = 300) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0.8}
    async with httpx.AsyncClient(timeout=120, headers=user.headers) as http:
        async with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                results.append((response.status_code, response.headers.get("retry-after"), response.json()))
                return
            async for _ in response.aiter_lines():
                pass
            results.append((200, None, None))


async def test_queue_full_is_429_with_retry_after(base_url: str, user: Caller) -> None:
    # Two slots and a queue of two: of six simultaneous long requests, some must be refused.
    results: list = []
    await asyncio.gather(*(_long_stream(base_url, user, results, max_tokens=120) for _ in range(6)))
    refused = [r for r in results if r[0] == 429]
    assert refused, results
    assert all(r[1] is not None and int(r[1]) >= 1 for r in refused)
    assert "busy" in refused[0][2]["error"]["message"] and refused[0][2]["error"]["type"] == "rate_limit_error"
    assert sum(r[0] == 200 for r in results) >= 2


async def test_client_disconnect_frees_the_slots(base_url: str, user: Caller) -> None:
    """Fill both slots and the queue with endless streams, walk away, and the capacity is back at once."""

    async def open_and_abandon() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                "max_tokens": 1500, "stream": True, "temperature": 0.9}
        async with httpx.AsyncClient(timeout=60, headers=user.headers) as http:
            async with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                seen = 0
                async for line in response.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        break  # closes the connection mid-stream

    await asyncio.gather(open_and_abandon(), open_and_abandon())
    await asyncio.sleep(0.15)
    # Both slots must be free again: two more requests start without queueing behind 1500-token stories.
    started = time.monotonic()
    results: list = []
    await asyncio.gather(*(_long_stream(base_url, user, results, max_tokens=5) for _ in range(4)))
    assert [r[0] for r in results] == [200] * 4
    assert time.monotonic() - started < 10


def test_grpc_deadline_is_honoured_and_frees_the_slot(stack: Stack, user: Caller) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.common.port_of('inference')}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        # A raw counting prompt at temperature 0 runs far past the deadline instead of ending early.
        request = pb.GenerateRequest(model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7,",
                                     sampling=pb.SamplingParams(max_tokens=1500, temperature=0))
        started = time.monotonic()
        # Either side may act first: the client's deadline fires (DEADLINE_EXCEEDED), or the server,
        # which sees the same deadline, ends the stream with finish reason CANCELLED.
        try:
            replies = list(stub.Generate(request, timeout=0.5, metadata=user.metadata))
            assert replies[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.0
        # Both slots are usable again right away.
        quick = pb.GenerateRequest(model=MODEL, prompt="Hi", sampling=pb.SamplingParams(max_tokens=2))
        for _ in range(2):
            assert list(stub.Generate(quick, timeout=30, metadata=user.metadata))[-1].usage.completion_tokens >= 1


def test_load_and_unload_through_rest(base_url: str, admin: Caller, user: Caller) -> None:
    refused = httpx.post(f"{base_url}/v1/models/{MODEL}:unload", json={}, headers=user.headers)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    unloaded = httpx.post(f"{base_url}/v1/models/{MODEL}:unload", json={}, timeout=60, headers=admin.headers)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "MODEL_STATE_AVAILABLE"
    assert unloaded.json()["memory_mib"] == 0
    loaded = httpx.post(f"{base_url}/v1/models/{MODEL}:load", json={}, timeout=120, headers=admin.headers)
    assert loaded.status_code == 200 and loaded.json()["state"] == "MODEL_STATE_READY"
    assert loaded.json()["memory_mib"] > 50
    assert httpx.post(f"{base_url}/v1/models/nope:load", json={}, headers=admin.headers).status_code == 404


def test_a_request_too_large_for_an_unloaded_model_is_400_and_loads_nothing(base_url: str, admin: Caller,
                                                                          user: Caller) -> None:
    """Size is checked against the window the model would load with (2,048 tokens here: 16,384
    characters), before the load: a request that could never fit costs no model load."""
    huge = [{"role": "user", "content": "a" * 20_000}]
    unloaded = httpx.post(f"{base_url}/v1/models/{MODEL}:unload", json={}, timeout=60, headers=admin.headers)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "MODEL_STATE_AVAILABLE"
    try:
        for path, body in [(f"/v1/models/{MODEL}:countTokens", {"messages": huge}),
                           (f"/v1/models/{MODEL}:generate", {"messages": huge}),
                           ("/v1/chat/completions", {"model": MODEL, "messages": huge})]:
            refused = httpx.post(f"{base_url}{path}", json=body, timeout=60, headers=user.headers)
            assert refused.status_code == 400, (path, refused.text)
            assert "20000 characters; at most 16384" in refused.text, refused.text
            state = httpx.get(f"{base_url}/v1/models/{MODEL}", headers=user.headers).json()["state"]
            assert state == "MODEL_STATE_AVAILABLE", path
    finally:
        loaded = httpx.post(f"{base_url}/v1/models/{MODEL}:load", json={}, timeout=120, headers=admin.headers)
        assert loaded.status_code == 200 and loaded.json()["state"] == "MODEL_STATE_READY"


def test_hardware_report_is_for_admins(base_url: str, admin: Caller, user: Caller) -> None:
    assert httpx.get(f"{base_url}/v1/admin/hardware", headers=user.headers).status_code == 403
    report = httpx.get(f"{base_url}/v1/admin/hardware", headers=admin.headers).json()
    assert report["detected"]["physical_cores"] >= 1
    assert report["chosen"]["engine"] == "llama.cpp" and report["chosen"]["reasons"]


def test_openai_paths_need_a_credential(base_url: str, client: openai.OpenAI) -> None:
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    anonymous = openai.OpenAI(base_url=f"{base_url}/v1", api_key="pk-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_api_key_create_use_revoke_through_the_openai_sdk(base_url: str, user: Caller) -> None:
    created = httpx.post(f"{base_url}/v1/api-keys", json={"name": "sdk"}, headers=user.headers).json()
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=created["secret"], max_retries=0)
    assert MODEL in [m.id for m in sdk.models.list().data]
    revoked = httpx.delete(f"{base_url}/v1/api-keys/{created['api_key']['id']}", headers=user.headers)
    assert revoked.status_code == 200
    time.sleep(1.5)  # the shared stack trusts a verified key for 1 s (PARLEY_API_KEY_CACHE_SECONDS)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()
