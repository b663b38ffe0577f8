"""OpenAI's Responses API wire format: request parsing and the JSON and SSE that the `openai` SDK reads.

The gateway passes bodies through verbatim (google.api.HttpBody), so this module owns the exact bytes.
Errors raised here are domain errors; the gateway rewrites their JSON into OpenAI's {"error": {...}}
shape (services/gateway/envoy_config.py).

What maps to what: a response is one answer of a conversation. Input items become the turn's
messages (user and assistant messages, `function_call` items as the assistant's tool calls,
`function_call_output` items as tool messages); `instructions` and system or developer messages
become the system prompt; function `tools`, `tool_choice`, `parallel_tool_calls` and `text.format`
become a services.core.structured Structure, and `reasoning.effort` its reasoning_effort
("none" turns thinking off); `temperature`, `top_p` and `max_output_tokens` the sampling. Output: a
`reasoning` item with a reasoning model's thinking (its text as `reasoning_text` content; Parley
writes no summaries), a `message` item with the text (if any, or if there are no calls) and a
`function_call` item per call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from parley.inference.v1 import inference_pb2 as pb

from services.core import sampling as sampling_rules
from services.core.errors import InvalidArgument, NotFound
from services.core.structured import (
    PLAIN, REASONING_EFFORTS, Structure, TemplateOptions, ToolCall, make_structure,
    make_template_options,
)
from services.core.json_body import number, parse_object, text_parts
from services.session.history import Turn
from services.wire.tools import function_tool, json_format, openai_tool_choice, parallel_tool_calls, schema_json, tool_list

ID_PREFIX = "resp_"
MAX_ITEMS = 4096
MAX_METADATA_PAIRS = 16
TEXT_PART_TYPES = ("input_text", "output_text", "text")
# reasoning.effort values beyond the most a chat template knows ("high").
STRONGEST_EFFORT = {"xhigh": "high", "max": "high"}
SUMMARIES = (None, "auto", "concise", "detailed")
# Fields that would change what a response means and that Parley does not serve: a clear 400, not
# silence. Other unknown fields (include, truncation, service_tier…) are accepted and ignored.
UNSUPPORTED = {
    "background": "background responses are not supported: omit background (or set it to false) and "
                  "read the answer as it streams",
    "conversation": "conversation objects are not supported: continue a conversation with previous_response_id",
    "prompt": "prompt templates are not supported: send instructions and input",
}


def message_id_of(response_id: str) -> str:
    """The assistant message a response id names; NOT_FOUND for anything that is not a response id."""
    if not isinstance(response_id, str) or not response_id.startswith(ID_PREFIX) or not (
            0 < len(response_id) - len(ID_PREFIX) <= 64):
        raise NotFound(f"response {response_id!r} not found")
    return response_id[len(ID_PREFIX):]


@dataclass(frozen=True)
class ResponseRequest:
    model: str
    inputs: list[Turn]
    # instructions and the input's system/developer messages, in order, one paragraph each.
    system: str
    previous_response_id: str
    store: bool
    stream: bool
    sampling: pb.SamplingParams
    structure: Structure = PLAIN
    # As the Response object echoes them (and as they are stored with a stored response).
    echo: dict[str, Any] = field(default_factory=dict)

    def first_user_text(self) -> str:
        return next((t.content for t in self.inputs if t.role == "user" and t.content.strip()), "")


# --- parsing ---------------------------------------------------------------------------------------

def _text(content: Any, where: str) -> str:
    """A message's content: a string, or an array of text parts."""
    return text_parts(content, where, TEXT_PART_TYPES)


def _inputs(value: Any) -> tuple[list[Turn], list[str]]:
    """Input items as turns, and the text of system/developer messages."""
    if isinstance(value, str):
        return [Turn("user", value)], []
    if not isinstance(value, list):
        raise InvalidArgument("input must be a string or an array of items")
    if len(value) > MAX_ITEMS:
        raise InvalidArgument(f"input: at most {MAX_ITEMS} items, got {len(value)}")
    turns: list[Turn] = []
    system: list[str] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                system.append(text)
            elif role in ("user", "assistant"):
                turns.append(Turn(role, text))
            else:
                raise InvalidArgument(f"{where}.role must be user, assistant, system or developer, got {role!r}")
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
            if not all(isinstance(v, str) for v in (call_id, name, arguments)) or not call_id:
                raise InvalidArgument(f"{where}: a function_call needs call_id, name and arguments (strings)")
            call = ToolCall(call_id, name, arguments)
            if turns and turns[-1].role == "assistant":  # one answer: its text, then its calls
                last = turns.pop()
                turns.append(Turn("assistant", last.content, (*last.tool_calls, call)))
            else:
                turns.append(Turn("assistant", "", (call,)))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidArgument(f"{where}.call_id must be the call_id of the function_call it answers")
            output = item.get("output")
            turns.append(Turn("tool", output if isinstance(output, str) else _text(output, f"{where}.output"),
                              tool_call_id=call_id))
        elif kind == "reasoning":
            continue  # another model's reasoning: nothing this one can use
        else:
            raise InvalidArgument(f"{where}.type {kind!r} is not supported (message, function_call, "
                                  "function_call_output)")
    return turns, system


def _reasoning(value: Any) -> tuple[TemplateOptions, dict[str, Any]]:
    """`reasoning` ({"effort", "summary"}) as the chat template's options, and as the response echoes it.
    Summaries are accepted, never written: the reasoning item holds the model's own reasoning text."""
    if value is None:
        return TemplateOptions(), {"effort": None, "summary": None}
    if not isinstance(value, dict):
        raise InvalidArgument('reasoning must be an object such as {"effort": "low"}')
    effort, summary = value.get("effort"), value.get("summary", value.get("generate_summary"))
    if effort is not None and effort not in (*REASONING_EFFORTS, *STRONGEST_EFFORT):
        raise InvalidArgument(f"reasoning.effort must be one of {', '.join((*REASONING_EFFORTS, *STRONGEST_EFFORT))}, "
                              f"got {effort!r}")
    if summary not in SUMMARIES:
        raise InvalidArgument(f'reasoning.summary must be "auto", "concise" or "detailed", got {summary!r}')
    return make_template_options(None, STRONGEST_EFFORT.get(effort, effort)), {"effort": effort, "summary": summary}


def _structure(body: dict[str, Any]) -> tuple[Structure, dict[str, Any]]:
    """tools, tool_choice, parallel_tool_calls, text.format and reasoning, and how the response echoes
    them."""
    tools, echoed = [], []
    for i, tool in enumerate(tool_list(body)):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidArgument(f"tools[{i}]: only function tools are supported, got {kind!r}")
        tools.append(function_tool(tool, f"tools[{i}]", "parameters"))
        echoed.append({"type": "function", "name": tools[-1].name, "description": tools[-1].description or None,
                       "parameters": json.loads(tools[-1].parameters) if tools[-1].parameters else None,
                       "strict": bool(tool.get("strict", True))})
    choice, function = openai_tool_choice(body.get("tool_choice"), "auto", nested=False)
    parallel = parallel_tool_calls(body)
    text = body.get("text") or {}
    if not isinstance(text, dict):
        raise InvalidArgument("text must be an object")
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidArgument('text.format must be {"type": "text"}, {"type": "json_object"} or '
                              '{"type": "json_schema", "name", "schema"}')
    kind, schema = fmt["type"], ""
    echoed_format: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str):
            raise InvalidArgument("text.format.name must be a string")
        schema = schema_json(fmt.get("schema"), "text.format.schema")
        echoed_format = {"type": kind, "name": fmt["name"], "schema": json.loads(schema) if schema else {},
                         "strict": bool(fmt.get("strict", False)), "description": fmt.get("description")}
    template, reasoning = _reasoning(body.get("reasoning"))
    structure = make_structure(tools, choice, function, parallel, json_format(kind, schema), schema, template)
    echo = {"tools": echoed,
            "tool_choice": {"type": "function", "name": function} if choice == "function" else choice,
            "parallel_tool_calls": True if parallel is None else parallel,
            "text": {"format": echoed_format}, "reasoning": reasoning}
    return structure, echo


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
        raise InvalidArgument(f"metadata must be an object of at most {MAX_METADATA_PAIRS} string values "
                              "(keys up to 64 characters, values up to 512)")
    return dict(value)


def parse_request(data: bytes) -> ResponseRequest:
    body = parse_object(data)
    for key, why in UNSUPPORTED.items():
        if body.get(key):
            raise InvalidArgument(why)
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string")
    if "input" not in body or body["input"] is None:
        raise InvalidArgument("input is required: a string or an array of items")
    inputs, system = _inputs(body["input"])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidArgument("instructions must be a string")
    previous = body.get("previous_response_id") or ""
    if not isinstance(previous, str):
        raise InvalidArgument("previous_response_id must be a string")
    if not inputs and not system:
        raise InvalidArgument("input must hold at least one message or function_call_output")
    flags = {}
    for key, default in (("store", True), ("stream", False)):
        value = body.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise InvalidArgument(f"{key} must be a boolean")
        flags[key] = value
    temperature, top_p = number(body, "temperature", float), number(body, "top_p", float)
    max_output_tokens = number(body, "max_output_tokens", int)
    given = sampling_rules.SamplingInput(temperature=temperature, top_p=top_p, max_tokens=max_output_tokens)
    try:
        sampling_rules.validate(given)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message.replace("max_tokens", "max_output_tokens")) from None
    structure, echo = _structure(body)
    user = body.get("user")
    echo.update(instructions=instructions, metadata=_metadata(body.get("metadata")), temperature=temperature,
                top_p=top_p, max_output_tokens=max_output_tokens, previous_response_id=previous or None,
                user=user if isinstance(user, str) else None, store=flags["store"])
    return ResponseRequest(
        model=model, inputs=inputs, system="\n\n".join(t for t in [instructions or "", *system] if t),
        previous_response_id=previous, store=flags["store"], stream=flags["stream"],
        sampling=sampling_rules.to_proto(given), structure=structure, echo=echo)
