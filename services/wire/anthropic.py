"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens): the request JSON as the
completion flow's request, and Anthropic's error shape.

What maps to what: `system` (a string or text blocks) is the chat's system message; a user turn's
text blocks its content and each `tool_result` block a tool message answering that call; an
assistant turn's text its content and each `tool_use` block one of its tool calls. `thinking` and
`redacted_thinking` blocks in the input (another model's signed reasoning) are left out: a chat
template does not take them back. `tools` (`input_schema`) and `tool_choice` (`auto`, `any`, `tool`,
`none`, `disable_parallel_tool_use`) become the same services.core.structured Structure the OpenAI
path builds, so the same grammars enforce them; `thinking` `disabled` turns a reasoning model's
thinking off (reasoning_effort "none"), `enabled` keeps it on with an effort from `budget_tokens`
(or `output_config.effort`), and without `thinking` (or with `adaptive`) the model's own default
holds, as on the OpenAI path; `output_config.format` (a JSON schema) is the answer's response format. `max_tokens` is
required, as Anthropic requires it. Image and document blocks are a 400: local models take text.
Unknown top-level fields are ignored, as new clients send new ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

from services.core.errors import InvalidArgument
from services.core.json_body import number, parse_object, text_parts
from services.core.sampling import SamplingInput
from services.core.structured import Structure, ToolCall, make_structure, make_template_options
from services.wire.tools import function_tool, schema_json, tool_list
from services.wire.status import ANTHROPIC_ERROR_TYPES, HTTP_STATUS

ROLES = ("user", "assistant")
# Blocks from another model's turn that a chat template cannot take back: dropped, not a 400.
DROPPED_BLOCKS = ("thinking", "redacted_thinking")
# Anthropic's server tools (web search, code execution, bash…) run at Anthropic; only client tools here.
CLIENT_TOOL_TYPES = (None, "custom")
TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
# thinking.budget_tokens → the reasoning_effort a chat template knows (gpt-oss reads it): below
# each bound the effort beside it.
EFFORTS = ((4096, "low"), (16384, "medium"))
# output_config.effort → reasoning_effort ("xhigh" and "max" are beyond what a chat template knows).
OUTPUT_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
# "adaptive" and "between_tools" leave thinking to the model, as no `thinking` does.
THINKING_TYPES = ("enabled", "disabled", "adaptive", "between_tools")
MAX_METADATA_BYTES = 4096

@dataclass(frozen=True)
class MessagesRequest:
    model: str
    messages: list[dict[str, Any]]
    structure: Structure
    sampling: SamplingInput
    stream: bool = False

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return tuple(self.sampling.stop)


def error_json(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    """Anthropic's error body for a status: what its SDKs read into their typed errors."""
    kind = ANTHROPIC_ERROR_TYPES.get(HTTP_STATUS.get(code.value[0], 500), "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def parse_request(data: bytes) -> MessagesRequest:
    """A Messages request (POST /v1/messages)."""
    body = parse_object(data)
    max_tokens = number(body, "max_tokens", int)
    if max_tokens is None:
        raise InvalidArgument("max_tokens is required (the most tokens the answer may have)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidArgument("stream must be a boolean")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or len(json.dumps(metadata)) > MAX_METADATA_BYTES):
        raise InvalidArgument(f"metadata must be an object of at most {MAX_METADATA_BYTES} bytes")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise InvalidArgument("stop_sequences must be an array of strings")
    sampling = SamplingInput(temperature=number(body, "temperature", float), top_p=number(body, "top_p", float),
                             top_k=number(body, "top_k", int), max_tokens=max_tokens, stop=tuple(stops or ()))
    model, messages, structure = parse_prompt(body)
    return MessagesRequest(model, messages, structure, sampling, stream)


def parse_count_request(data: bytes) -> tuple[str, list[dict[str, Any]], Structure]:
    """A count_tokens request: the prompt parts of a Messages request."""
    return parse_prompt(parse_object(data))


def parse_prompt(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], Structure]:
    """model, system + messages as the engine's chat, and tools, tool_choice and thinking."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model is required: a model id (GET /v1/models lists them)")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("messages must be a non-empty array")
    system = body.get("system")
    messages = [{"role": "system", "content": _text(system, "system")}] if system else []
    for i, message in enumerate(raw):
        messages += _turn(message, i)
    return model, messages, _structure(body)


def _text(content: Any, where: str) -> str:
    """A string, or text blocks (what `system` and a tool result's content are); a system
    prompt's blocks are paragraphs."""
    return text_parts(content, where, ("text",), "\n\n" if where == "system" else "")


def _turn(message: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as the engine's messages: a user turn may also answer tool calls
    (tool messages, in the order of its blocks), an assistant turn may call tools."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InvalidArgument(f"{where} must be an object with role \"user\" or \"assistant\"")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidArgument(f"{where}.content must be a string or an array of content blocks")
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in DROPPED_BLOCKS:
            continue
        elif kind == "tool_use" and role == "assistant":
            calls.append(_past_call(block, at))
        elif kind == "tool_result" and role == "user":
            if texts:  # text before a result stays before it
                out.append({"role": "user", "content": "".join(texts)})
                texts = []
            out.append(_result(block, at))
        elif kind in ("image", "document"):
            raise InvalidArgument(f"{at}: {kind} blocks are not supported: this model takes text only")
        else:
            raise InvalidArgument(f"{at} must be a text, tool_use (assistant) or tool_result (user) block, "
                                  f"got {kind!r}")
    if role == "assistant":
        turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    if texts or not out:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _past_call(block: dict[str, Any], at: str) -> ToolCall:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not isinstance(arguments, dict):
        raise InvalidArgument(f"{at} must be {{\"type\": \"tool_use\", \"id\", \"name\", \"input\": {{...}}}}")
    return ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False))


def _result(block: dict[str, Any], at: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidArgument(f"{at}.tool_use_id must be the id of the tool_use block this answers")
    content = block.get("content")
    text = "" if content is None else _text(content, f"{at}.content")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise InvalidArgument(f"{at}.is_error must be a boolean")
    return {"role": "tool", "content": f"Error: {text}" if is_error else text, "tool_call_id": call_id}


def _structure(body: dict[str, Any]) -> Structure:
    tools = []
    for i, tool in enumerate(tool_list(body)):
        if not isinstance(tool, dict) or tool.get("type") not in CLIENT_TOOL_TYPES:
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidArgument(f"tools[{i}]: only client tools ({{\"name\", \"description\", \"input_schema\"}}) "
                                  f"are supported, got type {kind!r}")
        tools.append(function_tool(tool, f"tools[{i}]", "input_schema"))
    choice = body.get("tool_choice")
    kind, name, parallel = ("auto" if tools else ""), "", None
    if choice is not None:
        given = choice.get("type") if isinstance(choice, dict) else None
        if not isinstance(given, str) or given not in TOOL_CHOICES:
            raise InvalidArgument('tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
                                  '{"type": "tool", "name": ...}')
        kind = TOOL_CHOICES[given]
        if kind == "function":
            name = choice.get("name")
            if not isinstance(name, str):
                raise InvalidArgument('tool_choice {"type": "tool"} needs the tool\'s "name"')
        disable = choice.get("disable_parallel_tool_use")
        if disable is not None and not isinstance(disable, bool):
            raise InvalidArgument("tool_choice.disable_parallel_tool_use must be a boolean")
        parallel = None if disable is None else not disable
    return make_structure(tools, kind, name, parallel, *_format(body),
                          template=make_template_options(None, _effort(body)))


def _effort(body: dict[str, Any]) -> str:
    """thinking and output_config.effort as a reasoning_effort: "" keeps the model's default."""
    config = body.get("output_config") or {}
    if not isinstance(config, dict):
        raise InvalidArgument("output_config must be an object")
    effort = config.get("effort")
    if effort is not None and (not isinstance(effort, str) or effort not in OUTPUT_EFFORTS):
        raise InvalidArgument(f"output_config.effort must be one of {', '.join(OUTPUT_EFFORTS)}, got {effort!r}")
    thinking = body.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if thinking is not None and kind not in THINKING_TYPES:
        raise InvalidArgument('thinking must be {"type": "enabled", "budget_tokens": N}, {"type": "disabled"} or '
                              '{"type": "adaptive"}')
    if kind == "disabled":
        return "none"
    if effort is not None:
        return OUTPUT_EFFORTS[effort]
    if kind != "enabled":
        return ""
    budget = number(thinking, "budget_tokens", int)
    if budget is None or budget < 1:
        raise InvalidArgument("thinking.budget_tokens must be a positive integer")
    return next((effort for bound, effort in EFFORTS if budget < bound), "high")


def _format(body: dict[str, Any]) -> tuple[str, str]:
    """output_config.format (a JSON schema the answer follows) as the response format and its schema."""
    config = body.get("output_config") or {}
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return "", ""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InvalidArgument('output_config.format must be {"type": "json_schema", "schema": {...}}')
    return "json_schema", schema_json(fmt["schema"], "output_config.format.schema")
