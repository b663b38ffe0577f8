"""Parsing an OpenAI chat completion request (services.wire.openai_chat), without a model:
what each field becomes, and the 400 that each wrong value gets."""

from __future__ import annotations

import json

import pytest

from services.core.errors import InvalidArgument
from services.wire.openai_chat import MAX_CHOICES, parse_request


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_sampling_fields_map_to_the_engine_s_names() -> None:
    req = parse_request(body(temperature=0.2, top_p=0.9, top_k=7, min_p=0.05, presence_penalty=0.5,
                             frequency_penalty=-0.5, repetition_penalty=1.1, seed=-1, max_tokens=9,
                             logit_bias={"42": -100}, stop="END"))
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.presence_penalty, s.frequency_penalty,
            s.repetition_penalty) == (0.2, 0.9, 7, 0.05, 0.5, -0.5, 1.1)
    assert s.seed == 0xFFFFFFFF and s.max_tokens == 9 and list(s.stop) == ["END"]
    assert list(s.logit_bias) == [(42, -100.0)]
    # max_completion_tokens wins over the deprecated max_tokens.
    assert parse_request(body(max_tokens=9, max_completion_tokens=3)).sampling.max_tokens == 3


def test_defaults_and_streaming_options() -> None:
    req = parse_request(body())
    assert (req.model, req.n, req.stream, req.include_usage, req.top_logprobs) == ("m", 1, False, False, None)
    assert req.sampling.temperature is None and req.sampling.max_tokens is None
    req = parse_request(body(stream=True, stream_options={"include_usage": True}, n=3, logprobs=True,
                             top_logprobs=2, user="u7"))
    assert (req.stream, req.include_usage, req.n, req.top_logprobs, req.user) == (True, True, 3, 2, "u7")
    assert parse_request(body(logprobs=True)).top_logprobs == 0


def test_messages_roles_and_text_parts() -> None:
    req = parse_request(json.dumps({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": None},
    ]}).encode())
    assert req.model == "" and [m["role"] for m in req.messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in req.messages] == ["Be brief.", "Hello, world", ""]


@pytest.mark.parametrize("data, words", [
    (b"{not json", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (body(model=5), "model must be a string"),
    (json.dumps({"model": "m", "messages": []}).encode(), "non-empty array"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "'robot' is not supported"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), "only text parts"),
    (body(n=MAX_CHOICES + 1), "n must be between"),
    (body(stop=[1]), "stop must be"),
    (body(functions=[{"name": "f"}]), "send tools and tool_choice"),
    (body(modalities=["audio"]), "only text output"),
    (body(logprobs="yes"), "logprobs must be a boolean"),
    (body(top_logprobs=2), "needs logprobs: true"),
    (body(logprobs=True, top_logprobs=21), "top_logprobs must be between"),
    (body(stream="yes"), "stream must be a boolean"),
    (body(stream_options=[1]), "stream_options must be an object"),
    (body(temperature="hot"), "temperature"),
])
def test_wrong_values_are_400_naming_the_field(data: bytes, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        parse_request(data)
