"""Legacy text completions (POST /v1/completions) through Envoy with the real bundled model: the
`openai` SDK streaming and not, echo, logprobs, stop, several prompts, the response cache, rate
limits, and the requests it refuses."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from services.stack import Stack
from tests.integration.conftest import Caller, new_user

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def user(stack: Stack) -> Caller:
    """This module's own account: its requests do not count against the shared user's rate limit."""
    return new_user(stack.url, "completer")


@pytest.fixture(scope="module")
def client(stack: Stack, user: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=user.api_key, max_retries=0, timeout=120)


def test_sdk_non_stream_and_stream_agree(client: openai.OpenAI) -> None:
    prompt = f"{PROMPT} ({uuid.uuid4().hex[:6]})"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.model == MODEL
    choice = whole.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert 1 <= whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 5
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_default_max_tokens_is_openais_16(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="Once upon a time, in a land far away,", temperature=0)
    assert answer.usage.completion_tokens == 16 and answer.choices[0].finish_reason == "length"


def test_echo_logprobs_and_stop(client: openai.OpenAI) -> None:
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT) and len(echoed.choices[0].text) > len(PROMPT)
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == scored.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == scored.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.top_logprobs[0]
    assert logprobs.text_offset[0] == len(PROMPT)
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=30, temperature=0, stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_several_prompts_and_choices(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt=["Roses are", "The sky is"], max_tokens=4, n=2,
                                       temperature=0.8, seed=7)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert all(c.text for c in answer.choices)
    streamed = list(client.completions.create(model=MODEL, prompt=["Roses are", "The sky is"], max_tokens=3,
                                              temperature=0, stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1}


def test_deterministic_answers_come_from_the_cache(stack: Stack, user: Caller) -> None:
    body = {"model": MODEL, "prompt": f"Cache me {uuid.uuid4().hex[:6]}:", "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=stack.url, headers=user.headers, timeout=120) as http:
        first = http.post("/v1/completions", json=body)
        assert first.status_code == 200 and first.headers["x-parley-cache"] == "miss"
        for _ in range(20):  # the answer is stored in the background, just after it was sent
            again = http.post("/v1/completions", json=body)
            if again.headers["x-parley-cache"] == "hit":
                break
        assert again.headers["x-parley-cache"] == "hit"
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == first.json()["usage"]["prompt_tokens"]
        echoed = http.post("/v1/completions", json={**body, "echo": True, "stream": True})
        assert echoed.headers["x-parley-cache"] == "hit" and body["prompt"] in echoed.text
        assert echoed.text.rstrip().endswith("data: [DONE]")


def test_refused_requests(client: openai.OpenAI, stack: Stack, user: Caller) -> None:
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="def f(x):", suffix="    return y")
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.completions.create(model="all-minilm-l6-v2", prompt="Hello")
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=MODEL, prompt="Hi", logprobs=9)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="Hi", temperature=7)
    raw = httpx.post(f"{stack.url}/v1/completions", headers=user.headers,
                     json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert raw.status_code == 400 and "use /v1/chat/completions" in raw.json()["error"]["message"]
    assert httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"}).status_code == 401


def test_rate_limit_counts_completion_tokens(stack: Stack, admin: Caller) -> None:
    someone = new_user(stack.url, "legacy")
    with httpx.Client(base_url=stack.url, timeout=120) as http:
        user_id = http.get("/v1/users/me", headers=someone.headers).json()["id"]
        assert http.patch(f"/v1/rate-limits/{user_id}", json={"tokens_per_minute": 10},
                          headers=admin.headers).status_code == 200
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=someone.api_key, max_retries=0, timeout=120)
    sdk.completions.create(model=MODEL, prompt="Tell me a long story about a dragon.", max_tokens=12)
    with pytest.raises(openai.RateLimitError, match="tokens"):
        for _ in range(20):
            sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
