"""OpenAI's chat completions wire format: request parsing and response rendering.

The gateway passes the body through verbatim (google.api.HttpBody), so this module owns the exact
JSON and SSE bytes that the `openai` SDK reads. Errors raised here are domain errors; the gateway's
Lua filter rewrites their JSON into OpenAI's {"error": {...}} shape.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import InvalidArgument
from services.core.json_body import number, parse_object, text_parts
from services.core.sampling import SamplingInput
from services.core.structured import PLAIN, ROLES, Structure, ToolCall, make_structure, make_template_options
from services.inference.engines.base import TokenLogprob, Usage
from services.inference.models.grammars import CallDelta
from services.wire.tools import (
    function_tool, json_format, openai_tool_choice, parallel_tool_calls, schema_json, tool_list,
)

ROLE_ALIASES = {"developer": "system"}
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class ChatCompletionRequest:
    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingInput
    stream: bool
    include_usage: bool
    user: str
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs
    structure: Structure = PLAIN


def _content_text(content: Any, index: int) -> str:
    return "" if content is None else text_parts(content, f"messages[{index}].content", ("text",))


def parse_request(data: bytes) -> ChatCompletionRequest:
    body = parse_object(data)
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidArgument("messages must be a non-empty array")
    messages = [_message(message, i) for i, message in enumerate(raw_messages)]
    structure = _structure(body)
    n = number(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}")
    if body.get("functions") or body.get("function_call"):
        raise InvalidArgument("functions and function_call are deprecated; send tools and tool_choice")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (modalities is not None and modalities != ["text"]):
        raise InvalidArgument("only text output is supported (modalities [\"text\"], no audio)")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidArgument("logprobs must be a boolean")
    top_logprobs = number(body, "top_logprobs", int)
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
    return ChatCompletionRequest(
        model=model,
        messages=messages,
        sampling=_sampling(body),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        user=str(body.get("user", "")),
        n=n,
        top_logprobs=(top_logprobs or 0) if logprobs else None,
        structure=structure,
    )


def _sampling(body: dict[str, Any]) -> SamplingInput:
    """The sampling fields as given (ranges are checked with every API's, services.core.sampling)."""
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidArgument("stop must be a string or an array of strings")
    max_tokens = number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", int)
    seed = number(body, "seed", int)
    return SamplingInput(
        min_p=number(body, "min_p", float),
        presence_penalty=number(body, "presence_penalty", float),
        frequency_penalty=number(body, "frequency_penalty", float),
        logit_bias=_logit_bias(body.get("logit_bias")),
        temperature=number(body, "temperature", float),
        top_p=number(body, "top_p", float),
        top_k=number(body, "top_k", int),
        repetition_penalty=number(body, "repetition_penalty", float),
        seed=None if seed is None else seed & 0xFFFFFFFF,
        max_tokens=max_tokens,
        stop=stops,
    )


def _message(message: Any, i: int) -> dict[str, Any]:
    """One OpenAI message as the engine's dict: role, text content, tool calls or the call answered."""
    if not isinstance(message, dict):
        raise InvalidArgument(f"messages[{i}] must be an object")
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise InvalidArgument(f"messages[{i}].role {message.get('role')!r} is not supported "
                              "(system, developer, user, assistant, tool)")
    out: dict[str, Any] = {"role": role, "content": _content_text(message.get("content"), i)}
    calls = message.get("tool_calls")
    if calls is not None and role == "assistant":
        if not isinstance(calls, list):
            raise InvalidArgument(f"messages[{i}].tool_calls must be an array")
        out["tool_calls"] = [_past_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(calls)]
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidArgument(f"messages[{i}].tool_call_id must be the id of the call this message answers")
        out["tool_call_id"] = call_id
    return out


def _past_call(call: Any, where: str) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(call.get("id"), str):
        raise InvalidArgument(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    name, arguments = function.get("name"), function.get("arguments", "{}")
    if isinstance(arguments, dict):  # as some clients send them (llama-server takes both)
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise InvalidArgument(f"{where}.function.name must be a string and .arguments a JSON object or its text")
    return ToolCall(call["id"], name, arguments)


def _structure(body: dict[str, Any]) -> Structure:
    """tools, tool_choice, parallel_tool_calls and response_format."""
    tools = []
    for i, tool in enumerate(tool_list(body)):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidArgument(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        tools.append(function_tool(function, f"tools[{i}].function", "parameters"))
    choice, function_name = openai_tool_choice(body.get("tool_choice"), "auto" if tools else "", nested=True)
    fmt = body.get("response_format")
    kind, schema = "text", ""
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidArgument('response_format must be {"type": "text"}, {"type": "json_object"} or '
                                  '{"type": "json_schema", "json_schema": {"name", "schema"}}')
        kind = fmt["type"]
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise InvalidArgument("response_format.json_schema must be an object with a name")
            schema = schema_json(spec.get("schema"), "response_format.json_schema.schema")
    return make_structure(tools, choice, function_name, parallel_tool_calls(body), json_format(kind, schema), schema,
                          make_template_options(body.get("chat_template_kwargs"), body.get("reasoning_effort")))


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
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def finish_reason(reason: str | None) -> str:
    # OpenAI has no "cancelled": a generation cut short by the deadline reports "length".
    return reason if reason in ("stop", "tool_calls") else "length"


def tool_calls_json(calls: list[ToolCall], at: int | None = None) -> list[dict[str, Any]]:
    """Calls as a message holds them; numbered from `at` as stream deltas carry them."""
    return [{**({"index": at + i} if at is not None else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]


def call_delta_json(delta: CallDelta) -> dict[str, Any]:
    if delta.id:
        return {"index": delta.index, "id": delta.id, "type": "function",
                "function": {"name": delta.name, "arguments": delta.arguments}}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


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
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str = ""

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text or (None if self.tool_calls else ""),
                                   "refusal": None}
        if self.reasoning:  # the field llama-server, vLLM and DeepSeek use
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = tool_calls_json(self.tool_calls)
        return message


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
        body["choices"] = [{"index": i, "message": c.message(),
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

    @staticmethod
    def error_event(message: str) -> bytes:
        """OpenAI's in-stream error: the SDK raises it as an APIError."""
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": "server_error"}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
