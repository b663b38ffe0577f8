"""The legacy /v1/completions request: what it takes from the chat parser and what is its own."""

from __future__ import annotations

import json

import pytest

from services.core.errors import InvalidArgument
from services.inference.engines.base import TokenLogprob
from services.wire.openai_text import LegacyLogprobs, parse_request


def parse(**body: object):
    return parse_request(json.dumps({"model": "m", **body}).encode())


def test_prompts_and_defaults() -> None:
    req = parse(prompt="Hello")
    assert req.prompts == ["Hello"] and req.sampling.max_tokens == 16 and not req.echo and req.logprobs is None
    req = parse(prompt=["a", "b"], n=2, max_tokens=5, stop="\n", temperature=0, echo=True, stream=True,
                stream_options={"include_usage": True})
    assert req.prompts == ["a", "b"] and req.n == 2 and req.sampling.max_tokens == 5
    assert req.sampling.stop == ["\n"] and req.echo and req.stream and req.include_usage
    assert parse(prompt="x", logprobs=0).logprobs == 0


@pytest.mark.parametrize(("body", "message"), [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": ""}, "must not be empty"),
    ({"prompt": ["a", ""]}, r"prompt\[1\] is empty"),
    ({"prompt": [1, 2, 3]}, "token ids are not supported"),
    ({"prompt": None}, "prompt must be"),
    ({"prompt": "x", "logprobs": 6}, "logprobs must be"),
    ({"prompt": "x", "logprobs": True}, "logprobs must be"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo with logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "messages": []}, "use /v1/chat/completions"),
    ({"prompt": "x", "tools": []}, "use /v1/chat/completions"),
    ({"prompt": ["a"] * 9, "n": 2}, "at most 16"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),  # checked by the shared chat parser
    ({"prompt": "x", "stop": 3}, "stop"),
])
def test_refused(body: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse(**body)


def test_legacy_logprobs_offsets_run_on_from_the_prompt() -> None:
    offsets = LegacyLogprobs(5)
    first = offsets.json([TokenLogprob(" Paris", b" Paris", -0.5, ((" Paris", b" Paris", -0.5), (" Lyon", b" Lyon", -2.0)))])
    second = offsets.json([TokenLogprob(".", b".", -0.1)])
    assert first == {"tokens": [" Paris"], "token_logprobs": [-0.5], "top_logprobs": [{" Paris": -0.5, " Lyon": -2.0}],
                     "text_offset": [5]}
    assert second["text_offset"] == [11]
