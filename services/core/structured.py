"""Tools, tool calls and response formats as every service sees them, and their one conversion to and
from the contract (parley.inference.v1.StructuredOutput, ChatMessage, ToolCall).

A chat message is a dict: {"role", "content"} and, for an assistant message that called tools,
"tool_calls" (a list of ToolCall), for a tool message "tool_call_id". Inference turns a Structure
into a grammar and a prompt (services.inference.models.grammars); session stores tool turns; the cache
keys on all of it.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from parley.inference.v1 import inference_pb2 as pb

from services.core import json_body
from services.core.errors import InvalidArgument

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CHOICES = ("auto", "none", "required", "function")
FORMATS = ("text", "json_object", "json_schema")
MAX_TOOLS = 128
MAX_SCHEMA_BYTES = 64 * 1024
ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 4096  # checked before anything renders them
_ID_ALPHABET = string.ascii_letters + string.digits
# Keywords the grammar enforces, and annotations that constrain nothing; any other keyword gets a 400
# naming it rather than being silently ignored.
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength",
            "maxLength", "pattern", "format"}
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")  # whole-number bounds, on integers and numbers
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly", "writeOnly",
               "deprecated", "discriminator", "strict"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""  # a JSON Schema object as canonical JSON text; "" means no arguments

    def schema(self) -> dict[str, Any]:
        return json.loads(self.parameters) if self.parameters else {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text

    @staticmethod
    def new_id() -> str:
        return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# Variables a chat template gets from the request itself: chat_template_kwargs may not replace them.
TEMPLATE_VARIABLES = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
                      "strftime_now"}
MAX_TEMPLATE_KWARGS_BYTES = 16 * 1024


@dataclass
class Answer:
    """What one answer has said so far — its text, its reasoning apart, its complete tool calls — from
    a stream of pieces: the one accumulator of a streamed answer (the flow's cache entry, each OpenAI
    choice, a session's stored message)."""

    parts: list[str] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    pieces: int = 0  # pieces that said something: about a token each, for an answer cut short

    def add(self, text: str, reasoning: str = "", calls: Iterable[ToolCall] = ()) -> bool:
        """Takes one piece; whether it said anything."""
        calls = list(calls)
        if not (text or reasoning or calls):
            return False
        self.pieces += 1
        self.parts.append(text)
        self.thoughts.append(reasoning)
        self.calls += calls
        return True

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reasoning(self) -> str:
        return "".join(self.thoughts)


@dataclass(frozen=True)
class TemplateOptions:
    """What a request passes to the model's chat template beyond its messages and tools: thinking on
    (the default, as llama-server renders templates) or off, and extra template variables."""

    kwargs: str = ""  # chat_template_kwargs: a JSON object as canonical text; "" none
    reasoning_effort: str = ""  # "" (the model's default) or one of REASONING_EFFORTS

    @property
    def thinking(self) -> bool:
        """Whether the model may think: off with reasoning_effort "none" or enable_thinking false."""
        if self.reasoning_effort == "none":
            return False
        return not self.kwargs or json.loads(self.kwargs).get("enable_thinking", True) is not False

    def variables(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.kwargs) if self.kwargs else {}
        out["enable_thinking"] = self.thinking
        if self.reasoning_effort and self.reasoning_effort != "none":
            out["reasoning_effort"] = self.reasoning_effort
        return out


def make_template_options(kwargs: Any = None, reasoning_effort: Any = None) -> TemplateOptions:
    """chat_template_kwargs (a JSON object, or its text) and reasoning_effort, checked
    (INVALID_ARGUMENT naming the field)."""
    if isinstance(kwargs, str):
        kwargs = json_body.loads(kwargs, "chat_template_kwargs") if kwargs else None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidArgument("chat_template_kwargs must be an object")
    text = canonical_json(kwargs) if kwargs else ""
    if len(text) > MAX_TEMPLATE_KWARGS_BYTES:
        raise InvalidArgument(f"chat_template_kwargs is larger than {MAX_TEMPLATE_KWARGS_BYTES} bytes")
    for name in kwargs or {}:
        if name in TEMPLATE_VARIABLES or not name.isidentifier():
            raise InvalidArgument(f"chat_template_kwargs: {name!r} cannot be set (it is not a template variable "
                                  "name, or the request sets it)")
    if reasoning_effort is not None and reasoning_effort not in ("", *REASONING_EFFORTS):
        raise InvalidArgument(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    return TemplateOptions(text, reasoning_effort or "")


@dataclass(frozen=True)
class Structure:
    """Tools the model may call and the format of its answer, and the options its chat template gets.
    The default is plain text with the template's defaults."""

    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"  # auto | none | required | function
    function: str = ""  # the tool to call when tool_choice is "function"
    parallel: bool = True  # several calls in one answer
    format: str = "text"  # text | json_object | json_schema
    schema: str = ""  # json_schema: canonical JSON text
    template: TemplateOptions = TemplateOptions()

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def plain(self) -> bool:
        return not self.calls_tools and self.format == "text"


PLAIN = Structure()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def make_structure(tools: Sequence[Tool], tool_choice: str = "", function: str = "", parallel: bool | None = None,
                   format: str = "", schema: str = "", template: TemplateOptions = TemplateOptions()) -> Structure:
    """Checks the parts against one another (INVALID_ARGUMENT naming the field) and applies defaults."""
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"tools: at most {MAX_TOOLS} tools")
    names = set()
    for i, tool in enumerate(tools):
        if not TOOL_NAME.match(tool.name):
            raise InvalidArgument(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'")
        if tool.name in names:
            raise InvalidArgument(f"tools[{i}].function.name {tool.name!r} is given twice")
        names.add(tool.name)
        if len(tool.parameters) > MAX_SCHEMA_BYTES:
            raise InvalidArgument(f"tools[{i}].function.parameters is larger than {MAX_SCHEMA_BYTES} bytes")
    tool_choice = tool_choice or "auto"
    if tool_choice not in TOOL_CHOICES:
        raise InvalidArgument(f"tool_choice must be one of {', '.join(TOOL_CHOICES[:3])} or a function, got {tool_choice!r}")
    if tool_choice == "function":
        if function not in names:
            raise InvalidArgument(f"tool_choice names the function {function!r}, which is not among tools")
    elif function:
        raise InvalidArgument("tool_choice_function is only for tool_choice 'function'")
    if tool_choice in ("required", "function") and not tools:
        raise InvalidArgument(f"tool_choice {tool_choice!r} needs tools")
    format = format or "text"
    if format not in FORMATS:
        raise InvalidArgument(f"response_format.type must be one of {', '.join(FORMATS)}, got {format!r}")
    if (format == "json_schema") != bool(schema):
        raise InvalidArgument("response_format json_schema needs json_schema.schema" if format == "json_schema"
                              else "a json_schema is only for response_format json_schema")
    if len(schema) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"response_format.json_schema.schema is larger than {MAX_SCHEMA_BYTES} bytes")
    # Every service checks here, so a schema the grammar could not enforce is a 400 before anything
    # is stored or queued.
    for i, tool in enumerate(tools):
        check_schema(tool.schema(), f"tools[{i}].function.parameters")
    if schema:
        check_schema(json.loads(schema), "response_format.json_schema.schema")
    return Structure(tools=tuple(tools), tool_choice=tool_choice, function=function,
                     parallel=True if parallel is None else parallel, format=format, schema=schema, template=template)


def check_schema(schema: Any, where: str) -> None:
    """INVALID_ARGUMENT naming the first keyword the grammar could not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{where} must be a JSON Schema object")
    for key, value in schema.items():
        if key.startswith("x-") or key in ANNOTATIONS:
            continue
        if key in BOUNDS:
            if schema.get("type") not in ("integer", "number"):
                raise InvalidArgument(f"{where}: {key!r} is supported with \"type\": \"integer\" or \"number\"")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
                raise InvalidArgument(f"{where}.{key}: only whole-number bounds are supported, got {value!r}")
            continue
        if key not in ENFORCED:
            raise InvalidArgument(f"{where}: the JSON Schema keyword {key!r} is not supported "
                                  f"(supported: {', '.join(sorted(ENFORCED))})")
        if key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise InvalidArgument(f"{where}.{key} must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{where}.{key}.{name}")
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise InvalidArgument(f"{where}.{key} must be a non-empty array")
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}.{key}[{i}]")
        elif key in ("items", "additionalProperties"):
            check_schema(value, f"{where}.{key}")
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
            raise InvalidArgument(f"{where}.$ref: only local references (#/...) are supported, got {value!r}")


# --- the contract -------------------------------------------------------------------------------
def from_proto(given: pb.StructuredOutput) -> Structure:
    tools = [Tool(t.name, t.description, _schema_text(t.parameters, f"tools[{i}].parameters"))
             for i, t in enumerate(given.tools)]
    return make_structure(
        tools, given.tool_choice, given.tool_choice_function,
        given.parallel_tool_calls if given.HasField("parallel_tool_calls") else None,
        given.response_format, _schema_text(given.json_schema, "json_schema") if given.json_schema else "",
        make_template_options(given.chat_template_kwargs, given.reasoning_effort))


def to_proto(structure: Structure) -> pb.StructuredOutput:
    template = structure.template
    if structure.plain and not structure.tools:
        return pb.StructuredOutput(chat_template_kwargs=template.kwargs, reasoning_effort=template.reasoning_effort)
    out = pb.StructuredOutput(chat_template_kwargs=template.kwargs, reasoning_effort=template.reasoning_effort,
        tools=[pb.Tool(name=t.name, description=t.description, parameters=t.parameters) for t in structure.tools],
        tool_choice=structure.tool_choice if structure.tools else "",
        tool_choice_function=structure.function, response_format=structure.format, json_schema=structure.schema)
    if structure.tools:
        out.parallel_tool_calls = structure.parallel
    return out


def _schema_text(text: str, field_name: str) -> str:
    """A JSON object given as text, in canonical form."""
    if not text:
        return ""
    value = json_body.loads(text, field_name)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field_name} must be a JSON object")
    return canonical_json(value)


def message_from_proto(m: pb.ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = calls_from_proto(m.tool_calls)
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def message_to_proto(message: dict[str, Any]) -> pb.ChatMessage:
    return pb.ChatMessage(role=message["role"], content=message.get("content") or "",
                          tool_calls=calls_to_proto(message.get("tool_calls", ())),
                          tool_call_id=message.get("tool_call_id", ""))


def calls_to_proto(calls: Iterable[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def calls_from_proto(calls: Iterable[pb.ToolCall]) -> list[ToolCall]:
    return [ToolCall(c.id, c.name, c.arguments) for c in calls]


def replayed_calls(calls: Iterable[pb.ToolCall]) -> list[ToolCall]:
    """A cached answer's calls under new ids: an id names one call of one answer."""
    return [ToolCall(ToolCall.new_id(), c.name, c.arguments) for c in calls]


def check_count(count: int) -> None:
    """The message count's limit: callers check it before they convert or read the messages."""
    if count > MAX_MESSAGES:
        raise InvalidArgument(f"messages: at most {MAX_MESSAGES} messages, got {count}")


def characters(message: dict[str, Any]) -> int:
    """What a message gives the template to render: its content and its calls' names and arguments."""
    return len(message.get("content") or "") + sum(len(c.name) + len(c.arguments) for c in message.get("tool_calls") or ())


def validate_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Roles, and that each tool message answers a call made earlier in the chat."""
    check_count(len(messages))
    called: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        calls = message.get("tool_calls") or ()
        if calls and role != "assistant":
            raise InvalidArgument(f"messages[{i}]: only assistant messages have tool_calls")
        for j, call in enumerate(calls):
            if not call.id:
                raise InvalidArgument(f"messages[{i}].tool_calls[{j}].id must not be empty")
            arguments = json_body.loads(call.arguments or "{}", f"messages[{i}].tool_calls[{j}].function.arguments")
            if not isinstance(arguments, dict):
                raise InvalidArgument(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")
            called.add(call.id)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not call_id:
                raise InvalidArgument(f"messages[{i}] (role tool) needs tool_call_id")
            if call_id not in called:
                raise InvalidArgument(f"messages[{i}].tool_call_id {call_id!r} answers no earlier tool call")
        elif message.get("tool_call_id"):
            raise InvalidArgument(f"messages[{i}]: only tool messages have tool_call_id")

