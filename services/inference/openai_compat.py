"""OpenAI's chat completions wire format: request parsing and response rendering.

The gateway passes the body through verbatim (google.api.HttpBody), so this module owns the exact
JSON and SSE bytes that the `openai` SDK reads. Errors raised here are domain errors; the gateway's
Lua filter rewrites their JSON into OpenAI's {"error": {...}} shape.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from services.core.errors import InvalidArgument
from services.inference.engines.base import TokenLogprob, Usage
from services.inference.service import SamplingInput

ROLE_ALIASES = {"developer": "system"}
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class ChatCompletionRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: SamplingInput
    stream: bool
    include_usage: bool
    user: str
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs

    @property
    def cacheable(self) -> bool:
        """One plain answer: what the response cache stores (it keeps no logprobs and one choice)."""
        return self.n == 1 and self.top_logprobs is None


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{index}].content[{j}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise InvalidArgument(f"messages[{index}].content must be a string or an array of text parts")


def _number(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise InvalidArgument(f"{key} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def parse_request(data: bytes) -> ChatCompletionRequest:
    try:
        body = json.loads(data or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidArgument("messages must be a non-empty array")
    messages = []
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}] must be an object")
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise InvalidArgument(f"messages[{i}].role {message.get('role')!r} is not supported (system, user, assistant)")
        messages.append({"role": role, "content": _content_text(message.get("content"), i)})
    n = _number(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidArgument("stop must be a string or an array of strings")
    for key in ("tools", "functions", "response_format"):
        if body.get(key) not in (None, False, [], {"type": "text"}):
            raise InvalidArgument(f"{key} is not supported yet")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidArgument("logprobs must be a boolean")
    top_logprobs = _number(body, "top_logprobs", int)
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    if top_logprobs is not None and not logprobs:
        raise InvalidArgument("top_logprobs needs logprobs: true")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidArgument("stream must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidArgument("stream_options must be an object")
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    seed = _number(body, "seed", int)
    sampling = SamplingInput(
        min_p=_number(body, "min_p", float),
        presence_penalty=_number(body, "presence_penalty", float),
        frequency_penalty=_number(body, "frequency_penalty", float),
        logit_bias=_logit_bias(body.get("logit_bias")),
        temperature=_number(body, "temperature", float),
        top_p=_number(body, "top_p", float),
        top_k=_number(body, "top_k", int),
        repetition_penalty=_number(body, "repetition_penalty", float),
        seed=None if seed is None else seed & 0xFFFFFFFF,
        max_tokens=max_tokens,
        stop=stops,
    )
    return ChatCompletionRequest(
        model=model,
        messages=messages,
        sampling=sampling,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        user=str(body.get("user", "")),
        n=n,
        top_logprobs=(top_logprobs or 0) if logprobs else None,
    )


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map as sorted (id, bias) pairs; ranges are checked with the rest
    of the sampling parameters."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidArgument("logit_bias must be an object of token id to bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 9):
            raise InvalidArgument(f"logit_bias: {key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise InvalidArgument(f"logit_bias[{key}] must be a number")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def usage_json(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def finish_reason(reason: str | None) -> str:
    # OpenAI has no "cancelled": a generation cut short by the deadline reports "length".
    return "stop" if reason == "stop" else "length"


def logprobs_json(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's choice.logprobs: each token with its log probability, bytes and top alternatives."""
    if logprobs is None:
        return None
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
                         "top_logprobs": [{"token": t, "logprob": p, "bytes": list(b)} for t, b, p in lp.top]}
                        for lp in logprobs],
            "refusal": None}


@dataclass
class ChoiceResult:
    """One choice of a finished non-streamed completion."""

    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


class CompletionWriter:
    """Renders one completion as OpenAI JSON or as OpenAI SSE chunks."""

    def __init__(self, model: str, fingerprint: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = f"fp_{fingerprint}" if fingerprint else None

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def complete(self, choices: list[ChoiceResult], usage: Usage | None) -> bytes:
        body = self._base("chat.completion")
        body["choices"] = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "logprobs": logprobs_json(c.logprobs), "finish_reason": finish_reason(c.finish_reason)}
                           for i, c in enumerate(choices)]
        body["usage"] = usage_json(usage)
        return json.dumps(body).encode()

    def chunk(self, delta: dict[str, Any], reason: str | None = None, *, final: bool = False,
              include_usage: bool = False, index: int = 0, logprobs: list[TokenLogprob] | None = None) -> bytes:
        body = self._base("chat.completion.chunk")
        body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs_json(logprobs),
                            "finish_reason": finish_reason(reason) if final else None}]
        if include_usage:
            body["usage"] = None
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def usage_chunk(self, usage: Usage | None) -> bytes:
        body = self._base("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage_json(usage)
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
