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
from services.inference.engines.base import Usage
from services.inference.service import SamplingInput

ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class ChatCompletionRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: SamplingInput
    stream: bool
    include_usage: bool
    user: str


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
    n = body.get("n", 1)
    if n != 1:
        raise InvalidArgument("n must be 1: several choices per request are not supported yet")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidArgument("stop must be a string or an array of strings")
    for key in ("tools", "functions", "response_format", "logprobs"):
        if body.get(key) not in (None, False, [], {"type": "text"}):
            raise InvalidArgument(f"{key} is not supported yet")
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
    )


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

    def complete(self, text: str, reason: str | None, usage: Usage | None) -> bytes:
        body = self._base("chat.completion")
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None, "finish_reason": finish_reason(reason)}]
        body["usage"] = usage_json(usage)
        return json.dumps(body).encode()

    def chunk(self, delta: dict[str, Any], reason: str | None = None, *, final: bool = False,
              usage: Usage | None = None, include_usage: bool = False) -> bytes:
        body = self._base("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
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
