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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from parley.inference.v1 import inference_pb2 as pb

from services.core import sampling as sampling_rules
from services.core.errors import InvalidArgument, NotFound
from services.core.structured import (
    PLAIN, REASONING_EFFORTS, Structure, TemplateOptions, Tool, ToolCall, canonical_json, make_structure,
    make_template_options,
)
from services.core.json_body import number, parse_object, text_parts
from services.session.history import Turn

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
SSE = "text/event-stream"
JSON = "application/json"


def message_id_of(response_id: str) -> str:
    """The assistant message a response id names; NOT_FOUND for anything that is not a response id."""
    if not isinstance(response_id, str) or not response_id.startswith(ID_PREFIX) or not (
            0 < len(response_id) - len(ID_PREFIX) <= 64):
        raise NotFound(f"response {response_id!r} not found")
    return response_id[len(ID_PREFIX):]


def call_item_id(call_id: str) -> str:
    return "fc_" + (call_id[5:] if call_id.startswith("call_") else call_id)


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


def _schema(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON Schema object")
    return canonical_json(value)


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
    raw_tools = body.get("tools") or []
    if not isinstance(raw_tools, list):
        raise InvalidArgument("tools must be an array")
    tools, echoed = [], []
    for i, tool in enumerate(raw_tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidArgument(f"tools[{i}]: only function tools are supported, got {kind!r}")
        name, description = tool.get("name"), tool.get("description") or ""
        if not isinstance(name, str) or not isinstance(description, str):
            raise InvalidArgument(f"tools[{i}].name and .description must be strings")
        parameters = _schema(tool.get("parameters"), f"tools[{i}].parameters")
        tools.append(Tool(name, description, parameters))
        echoed.append({"type": "function", "name": name, "description": description or None,
                       "parameters": json.loads(parameters) if parameters else None,
                       "strict": bool(tool.get("strict", True))})
    choice, function = body.get("tool_choice"), ""
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise InvalidArgument('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}')
        choice, function = "function", choice["name"]
    elif choice not in ("none", "auto", "required"):
        raise InvalidArgument(f'tool_choice must be "none", "auto", "required" or a function, got {choice!r}')
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidArgument("parallel_tool_calls must be a boolean")
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
        schema = _schema(fmt.get("schema"), "text.format.schema")
        echoed_format = {"type": kind, "name": fmt["name"], "schema": json.loads(schema) if schema else {},
                         "strict": bool(fmt.get("strict", False)), "description": fmt.get("description")}
        if not schema:
            kind = "json_object"  # a schema is optional: any JSON object then
    template, reasoning = _reasoning(body.get("reasoning"))
    structure = make_structure(tools, choice, function, parallel, kind, schema, template)
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


# --- rendering -------------------------------------------------------------------------------------

def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def usage_json(usage: pb.Usage | None) -> dict[str, Any]:
    usage = usage or pb.Usage()
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def message_item(item_id: str, text: str, status: str, role: str = "assistant") -> dict[str, Any]:
    part = ({"type": "output_text", "text": text, "annotations": [], "logprobs": []} if role == "assistant"
            else {"type": "input_text", "text": text})
    return {"id": item_id, "type": "message", "role": role, "status": status, "content": [part]}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"id": call_item_id(call.id), "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def output_items(message_id: str, text: str, calls: Sequence[ToolCall], status: str,
                 reasoning: str = "") -> list[dict[str, Any]]:
    """An answer's output: its reasoning (if any), its text as a message (also an empty one, when it
    made no calls), then one function_call item per call."""
    items = [reasoning_item(f"rs_{message_id}", reasoning, status)] if reasoning else []
    items += [message_item(f"msg_{message_id}", text, status)] if text or not calls else []
    return items + [call_item(c) for c in calls]


STATUS_OF_FINISH = {pb.FINISH_REASON_STOP: "completed", pb.FINISH_REASON_TOOL_CALLS: "completed",
                    pb.FINISH_REASON_LENGTH: "incomplete", pb.FINISH_REASON_CANCELLED: "incomplete"}


def response_json(response_id: str, *, created_at: float, model: str, status: str, echo: dict[str, Any],
                  output: list[dict[str, Any]], usage: pb.Usage | None = None, error: dict[str, Any] | None = None,
                  incomplete_reason: str | None = None) -> dict[str, Any]:
    """OpenAI's Response object."""
    done = status in ("completed", "incomplete", "failed")
    return {
        "id": response_id, "object": "response", "created_at": int(created_at), "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": incomplete_reason} if status == "incomplete" and incomplete_reason else None,
        "instructions": echo.get("instructions"), "max_output_tokens": echo.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "previous_response_id": echo.get("previous_response_id"),
        "reasoning": echo.get("reasoning", {"effort": None, "summary": None}),
        "store": echo.get("store", True), "temperature": echo.get("temperature"),
        "text": echo.get("text", {"format": {"type": "text"}}), "tool_choice": echo.get("tool_choice", "auto"),
        "tools": echo.get("tools", []), "top_p": echo.get("top_p"), "truncation": "auto",
        "usage": usage_json(usage) if done and usage is not None else None, "user": echo.get("user"),
        "metadata": echo.get("metadata", {}),
    }


def incomplete_reason(finish: int) -> str | None:
    return "max_output_tokens" if finish == pb.FINISH_REASON_LENGTH else None


def server_error(message: str, code: str = "server_error") -> dict[str, Any]:
    return {"code": code, "message": message}


class EventWriter:
    """One response's stream of semantic events, as OpenAI sends them: response.created and
    .in_progress; per output item .output_item.added, its content (.content_part.added,
    .output_text.delta… or .reasoning_text.delta…, .output_text.done or .reasoning_text.done,
    .content_part.done — or .function_call_arguments.delta and .done), .output_item.done; then
    .completed, .incomplete or .failed. The reasoning item comes first and closes when the text or a
    call begins. Every event carries its sequence_number. Also accumulates the final Response object
    (the non-streamed answer)."""

    def __init__(self, response_id: str, message_id: str, model: str, echo: dict[str, Any]) -> None:
        self.response_id = response_id
        self.message_id = message_id
        self.model = model
        self.echo = echo
        self.created_at = time.time()
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self._message_open = False
        self._reasoning_at: int | None = None  # the open reasoning item's output index
        self.final: dict[str, Any] | None = None  # the Response once finished or failed

    def _event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

    def response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_json(self.response_id, created_at=self.created_at, model=self.model, status=status,
                             echo=self.echo, output=self.output, **extra)

    def start(self) -> list[bytes]:
        return [self._event("response.created", response=self.response("in_progress")),
                self._event("response.in_progress", response=self.response("in_progress"))]

    def _open_message(self) -> list[bytes]:
        self._message_open = True
        item = message_item(f"msg_{self.message_id}", "", "in_progress")
        item["content"] = []
        self.output.append(item)
        index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def _close_message(self, status: str) -> list[bytes]:
        self._message_open = False
        index = next(i for i, item in enumerate(self.output) if item["type"] == "message")
        text = "".join(self.text)
        item = message_item(f"msg_{self.message_id}", text, status)
        self.output[index] = item
        part = item["content"][0]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _open_reasoning(self) -> list[bytes]:
        item = reasoning_item(f"rs_{self.message_id}", "", "in_progress")
        item["content"] = []
        self.output.append(item)
        self._reasoning_at = index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part={"type": "reasoning_text", "text": ""})]

    def _close_reasoning(self, status: str) -> list[bytes]:
        if self._reasoning_at is None:
            return []
        index, self._reasoning_at = self._reasoning_at, None
        text = "".join(self.reasoning)
        item = reasoning_item(self.output[index]["id"], text, status)
        self.output[index] = item
        return [self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=item["content"][0]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def delta(self, text: str, calls: Sequence[ToolCall], reasoning: str = "") -> list[bytes]:
        events: list[bytes] = []
        if reasoning and (self._reasoning_at is not None or not self.output):
            # Reasoning opens an answer (chat formats split it off the front); any after the text or
            # a call began is the stored message's, not a second item of this stream.
            if self._reasoning_at is None:
                events += self._open_reasoning()
            at = self._reasoning_at
            assert at is not None
            self.reasoning.append(reasoning)
            events.append(self._event("response.reasoning_text.delta", item_id=self.output[at]["id"], output_index=at,
                                      content_index=0, delta=reasoning))
        if text or calls:
            events += self._close_reasoning("completed")
        if text:
            if not self._message_open and not any(i["type"] == "message" for i in self.output):
                events += self._open_message()
            if self._message_open:
                self.text.append(text)
                index = len(self.output) - 1
                events.append(self._event("response.output_text.delta", item_id=f"msg_{self.message_id}",
                                          output_index=index, content_index=0, delta=text, logprobs=[]))
        for call in calls:
            if self._message_open:
                events += self._close_message("completed")
            item = call_item(call, "in_progress")
            item["arguments"] = ""
            self.output.append(item)
            index = len(self.output) - 1
            done = call_item(call)
            events += [self._event("response.output_item.added", output_index=index, item=item),
                       self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                   delta=call.arguments),
                       self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=call.name, arguments=call.arguments)]
            self.output[index] = done
            events.append(self._event("response.output_item.done", output_index=index, item=done))
        return events

    def finish(self, finish_reason: int, usage: pb.Usage) -> list[bytes]:
        status = STATUS_OF_FINISH.get(finish_reason, "completed")
        events = self._close_reasoning(status)
        if not any(i["type"] != "reasoning" for i in self.output):
            events += self._open_message()  # an answer with neither text nor calls is still an (empty) message
        if self._message_open:
            events += self._close_message(status)
        self.final = self.response(status, usage=usage, incomplete_reason=incomplete_reason(finish_reason))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return events + [self._event(kind, response=self.final)]

    def fail(self, message: str) -> list[bytes]:
        events = self._close_reasoning("incomplete")
        if self._message_open:
            events += self._close_message("incomplete")
        self.final = self.response("failed", error=server_error(message))
        return events + [self._event("response.failed", response=self.final)]


def item_list_json(items: list[dict[str, Any]], limit: int, order: str, after: str) -> dict[str, Any]:
    """OpenAI's list of input items: `order` asc or desc, from the item after `after`."""
    if limit == 0:
        limit = 20
    if not 1 <= limit <= 100:
        raise InvalidArgument("limit must be between 1 and 100")
    if order not in ("", "asc", "desc"):
        raise InvalidArgument('order must be "asc" or "desc"')
    ordered = items if order == "asc" else list(reversed(items))
    if after:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidArgument(f"after: no item {after!r} in this response's input")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}
