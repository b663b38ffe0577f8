"""OpenAI's legacy text completions wire format (POST /v1/completions): request parsing and the
JSON and SSE bytes of the answer.

The sampling parameters the two endpoints share (max_tokens, temperature, top_p, stop, seed, n,
penalties, logit_bias, stream, stream_options, user…) are checked by openai_chat.parse_request,
the one place that knows them; this module adds what is the legacy endpoint's own: `prompt`,
`echo`, `logprobs` as a number, `best_of`, and the refusal of `suffix`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import InvalidArgument
from services.core.sampling import SamplingInput
from services.core.json_body import parse_object
from services.wire import openai_chat
from services.inference.engines.base import TokenLogprob, Usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
MAX_LOGPROBS = 5
# Chat-only parameters: the legacy endpoint has no messages, tools or formats.
CHAT_ONLY = ("messages", "tools", "tool_choice", "parallel_tool_calls", "response_format", "functions",
             "function_call", "top_logprobs", "max_completion_tokens", "modalities", "audio")
OWN = ("prompt", "suffix", "echo", "logprobs", "best_of")


@dataclass(frozen=True)
class TextCompletionRequest:
    model: str
    prompts: list[str]
    sampling: SamplingInput
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False
    logprobs: int | None = None  # None: no logprobs; else how many alternatives per token


def _prompts(value: Any) -> list[str]:
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(isinstance(p, (int, list)) for p in value):
        raise InvalidArgument("prompt: token ids are not supported; send the text")
    else:
        raise InvalidArgument("prompt must be a string or a non-empty array of strings")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise InvalidArgument("prompt must not be empty" if len(prompts) == 1 else f"prompt[{i}] is empty")
    return prompts


def parse_request(data: bytes) -> TextCompletionRequest:
    body = parse_object(data)
    if body.get("suffix") is not None:
        raise InvalidArgument("suffix (fill-in-the-middle) is not supported: send the text before the gap as the "
                              "prompt")
    for name in CHAT_ONLY:
        if name in body:
            raise InvalidArgument(f"{name} is not a parameter of /v1/completions; use /v1/chat/completions")
    prompts = _prompts(body.get("prompt"))
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise InvalidArgument("echo must be a boolean")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise InvalidArgument(f"logprobs must be an integer between 0 and {MAX_LOGPROBS}")
    if echo and logprobs is not None:
        raise InvalidArgument("echo with logprobs is not supported: the prompt's tokens have no logprobs here")
    # The shared parameters, checked where the chat endpoint checks them (a placeholder message
    # stands in for the prompt).
    shared = {k: v for k, v in body.items() if k not in OWN}
    shared["messages"] = [{"role": "user", "content": ""}]
    if shared.get("max_tokens") is None:
        shared["max_tokens"] = DEFAULT_MAX_TOKENS
    common = openai_chat.parse_request(json.dumps(shared).encode())
    best_of = body.get("best_of")
    if best_of is not None and best_of != common.n:
        raise InvalidArgument("best_of is not supported (only best_of equal to n)")
    if len(prompts) * common.n > openai_chat.MAX_CHOICES:
        raise InvalidArgument(f"prompts × n must be at most {openai_chat.MAX_CHOICES}")
    return TextCompletionRequest(model=common.model, prompts=prompts, sampling=common.sampling, stream=common.stream,
                                 include_usage=common.include_usage, n=common.n, echo=echo, logprobs=logprobs)


@dataclass
class TextChoice:
    """One choice of a finished non-streamed completion."""

    text: str
    finish_reason: str | None = None
    logprobs: dict[str, list[Any]] | None = None


class LegacyLogprobs:
    """OpenAI's legacy logprobs of one choice: tokens, their log probabilities, the top alternatives
    as {token: logprob}, and each token's character offset in prompt + completion."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def json(self, logprobs: list[TokenLogprob]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            out["tokens"].append(lp.token)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({token: logprob for token, _, logprob in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(lp.token)
        return out


def extend(into: dict[str, list[Any]], more: dict[str, list[Any]]) -> None:
    for name, values in more.items():
        into[name].extend(values)


@dataclass
class TextCompletionWriter:
    """Renders one text completion as OpenAI JSON or as OpenAI SSE chunks."""

    model: str
    fingerprint: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _base(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": f"fp_{self.fingerprint}" if self.fingerprint else None}

    def complete(self, choices: list[TextChoice], usage: Usage | None) -> bytes:
        body = self._base()
        body["choices"] = [{"text": c.text, "index": i, "logprobs": c.logprobs,
                            "finish_reason": openai_chat.finish_reason(c.finish_reason)}
                           for i, c in enumerate(choices)]
        body["usage"] = openai_chat.usage_json(usage)
        return json.dumps(body).encode()

    def chunk(self, index: int, text: str, *, logprobs: dict[str, list[Any]] | None = None,
              finish_reason: str | None = None, include_usage: bool = False) -> bytes:
        body = self._base()
        body["choices"] = [{"text": text, "index": index, "logprobs": logprobs,
                            "finish_reason": openai_chat.finish_reason(finish_reason) if finish_reason else None}]
        if include_usage:
            body["usage"] = None
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def usage_chunk(self, usage: Usage | None) -> bytes:
        body = self._base()
        body["choices"] = []
        body["usage"] = openai_chat.usage_json(usage)
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    error_event = staticmethod(openai_chat.CompletionWriter.error_event)
    DONE = openai_chat.CompletionWriter.DONE
