"""Embeddings through Envoy against the real stack and the real bundled all-MiniLM-L6-v2: the `openai`
SDK (float and base64), LangChain's OpenAIEmbeddings, the native Embed RPC's REST path, the errors a
client can make, authentication, rate limits counting the inputs' tokens, and the metrics."""

from __future__ import annotations


import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from services.stack import Stack
from tests.embedding_reference import SENTENCES, cosines, reference
from tests.integration.conftest import Caller, new_user
from tests.integration.test_observability import scrape

MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def user(stack: Stack) -> Caller:
    """This module's own account: its requests do not count against the shared user's rate limit."""
    return new_user(stack.url, "embedder")


@pytest.fixture(scope="module")
def client(stack: Stack, user: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=user.api_key, max_retries=0, timeout=120)


def test_openai_sdk_float_and_base64_match_the_reference(client: openai.OpenAI, stack: Stack) -> None:
    floats = client.embeddings.create(model=MODEL, input=list(SENTENCES), encoding_format="float")
    assert floats.model == MODEL and floats.object == "list"
    assert [d.index for d in floats.data] == list(range(len(SENTENCES)))
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (len(SENTENCES), 384)
    similarity = cosines(vectors, reference(SENTENCES))
    assert similarity.min() >= 0.999, similarity
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(SENTENCES) * 3
    # The SDK's default asks for base64 and decodes it itself: the same vectors, bit for bit.
    packed = client.embeddings.create(model=MODEL, input=list(SENTENCES))
    assert np.array_equal(np.array([d.embedding for d in packed.data], dtype=np.float32), vectors.astype(np.float32))
    one = client.embeddings.create(model=MODEL, input=SENTENCES[2], encoding_format="float")
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, vectors[2], atol=1e-5)
    # Token ids (the model's own, without [CLS]/[SEP]) embed like the text.
    tokens = client.embeddings.create(model=MODEL, input=[[3000, 2003, 1996, 3007, 1997, 2605, 1012]],
                                      encoding_format="float")
    assert np.allclose(tokens.data[0].embedding, vectors[2], atol=1e-5)  # "paris is the capital of france."


def test_langchain_openai_embeddings(stack: Stack, user: Caller) -> None:
    embedder = OpenAIEmbeddings(model=MODEL, base_url=f"{stack.url}/v1", api_key=user.api_key,
                                check_embedding_ctx_length=False, max_retries=0)
    documents = embedder.embed_documents(["Cats purr when they are content.", "The stock market fell today."])
    query = embedder.embed_query("Why do cats purr?")
    assert len(documents) == 2 and len(query) == 384
    assert np.dot(query, documents[0]) > np.dot(query, documents[1]) + 0.2  # retrieval picks the cat


def test_native_embed_rpc_over_rest(stack: Stack, user: Caller) -> None:
    answer = httpx.post(f"{stack.url}/v1/models/{MODEL}:embed", headers=user.headers, timeout=120,
                        json={"inputs": [{"text": SENTENCES[0]}, {"tokens": [7592]}]})  # "hello"
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == MODEL and [e["tokens"] for e in body["embeddings"]] == [12, 3]
    assert body["prompt_tokens"] == 15
    assert cosines(np.array([body["embeddings"][0]["values"]]), reference(SENTENCES[:1]))[0] >= 0.999


def test_errors_are_400_in_openais_shape(client: openai.OpenAI, stack: Stack, user: Caller) -> None:
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] is 602 tokens .*at most 256"):
        client.embeddings.create(model=MODEL, input=["fine", "word " * 600])
    cut = client.embeddings.create(model=MODEL, input=["word " * 600], extra_body={"truncate": True})
    assert cut.usage.prompt_tokens == 256
    with pytest.raises(openai.BadRequestError, match="is a chat model"):
        client.embeddings.create(model=CHAT_MODEL, input="hello")
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-ada-002", input="hello")
    with pytest.raises(openai.BadRequestError, match="cannot shorten"):
        client.embeddings.create(model=MODEL, input="hello", dimensions=64)
    raw = httpx.post(f"{stack.url}/v1/embeddings", headers=user.headers,
                     json={"model": MODEL, "input": "hello", "encoding_format": "int8"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert "encoding_format" in raw.json()["error"]["message"]
    raw = httpx.post(f"{stack.url}/v1/embeddings", headers=user.headers, json={"model": MODEL, "input": [1.5]})
    assert raw.status_code == 400


def test_authentication_is_required(stack: Stack) -> None:
    anonymous = httpx.post(f"{stack.url}/v1/embeddings", json={"model": MODEL, "input": "hello"})
    assert anonymous.status_code == 401 and "error" in anonymous.json()
    forged = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        forged.embeddings.create(model=MODEL, input="hello")
    assert httpx.post(f"{stack.url}/v1/models/{MODEL}:embed", json={"inputs": [{"text": "hi"}]}).status_code == 401


def test_rate_limit_counts_embedding_tokens(stack: Stack, admin: Caller) -> None:
    someone = new_user(stack.url, "embed")
    with httpx.Client(base_url=stack.url, timeout=120) as http:
        user_id = http.get("/v1/users/me", headers=someone.headers).json()["id"]
        limited = http.patch(f"/v1/rate-limits/{user_id}", json={"tokens_per_minute": 40}, headers=admin.headers)
        assert limited.status_code == 200, limited.text
        sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=someone.api_key, max_retries=0, timeout=120)
        first = sdk.embeddings.create(model=MODEL, input=list(SENTENCES))  # more than 40 tokens
        assert first.usage.prompt_tokens > 40
        with pytest.raises(openai.RateLimitError, match="tokens"):
            for _ in range(20):  # the usage is recorded in the background, just after the answer
                sdk.embeddings.create(model=MODEL, input="hi")


def test_metrics_count_requests_inputs_and_tokens(stack: Stack, client: openai.OpenAI) -> None:
    port = stack.env["PARLEY_INFERENCE_METRICS_PORT"]
    model = (("model", MODEL),)
    before = scrape(port)
    answer = client.embeddings.create(model=MODEL, input=["one", "two", "three"])
    after = scrape(port)
    ok = ("parley_inference_embedding_requests_total", (("model", MODEL), ("outcome", "ok")))
    assert after[ok] == before.get(ok, 0) + 1
    inputs, tokens = "parley_inference_embedding_inputs_total", "parley_inference_embedding_tokens_total"
    assert after[(inputs, model)] == before.get((inputs, model), 0) + 3
    assert after[(tokens, model)] == before.get((tokens, model), 0) + answer.usage.prompt_tokens
    latency = "parley_inference_embedding_duration_seconds_count"
    assert after[(latency, model)] == before.get((latency, model), 0) + 1


def test_models_list_says_each_models_task(client: openai.OpenAI, stack: Stack, user: Caller) -> None:
    client.embeddings.create(model=MODEL, input="load it")
    models = {m["id"]: m for m in httpx.get(f"{stack.url}/v1/models", headers=user.headers).json()["data"]}
    assert models[MODEL]["task"] == "embedding" and models[MODEL]["dimensions"] == 384
    assert models[MODEL]["context_length"] == 256 and models[MODEL]["state"] == "MODEL_STATE_READY"
    assert models[CHAT_MODEL]["task"] == "chat"
