"""What the wire formats share when they read tools, a tool choice and a response format.

Each API nests them its own way — OpenAI chat `{"type": "function", "function": {name, description,
parameters}}`, Responses the same fields flat, Anthropic `{name, description, input_schema}` — but a
tool is always a name, a description and a JSON Schema, checked the same way, and a tool choice is
always none, auto, required or one named function (services.core.structured.make_structure).
"""

from __future__ import annotations

from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import Tool, canonical_json

OPENAI_CHOICES = ("none", "auto", "required")


def schema_json(value: Any, where: str) -> str:
    """A JSON Schema object as canonical JSON ("" when absent)."""
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON Schema object")
    return canonical_json(value)


def tool_list(body: dict[str, Any]) -> list[Any]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidArgument("tools must be an array")
    return tools


def function_tool(spec: dict[str, Any], where: str, schema_key: str) -> Tool:
    """A tool from its name, description and the JSON Schema under `schema_key`."""
    name, description = spec.get("name"), spec.get("description") or ""
    if not isinstance(name, str) or not isinstance(description, str):
        raise InvalidArgument(f"{where}.name and .description must be strings")
    return Tool(name, description, schema_json(spec.get(schema_key), f"{where}.{schema_key}"))


def openai_tool_choice(choice: Any, default: str, nested: bool) -> tuple[str, str]:
    """OpenAI's tool_choice as (choice, function name): "none", "auto", "required" or a named function,
    `{"type": "function", "function": {"name"}}` in chat completions (nested) and `{"type": "function",
    "name"}` in Responses."""
    if choice is None:
        return default, ""
    named = '{"type": "function", "function": {"name": ...}}' if nested else '{"type": "function", "name": ...}'
    if isinstance(choice, dict):
        holder = choice.get("function") if nested else choice
        if choice.get("type") != "function" or not isinstance(holder, dict) or not isinstance(holder.get("name"), str):
            raise InvalidArgument(f'tool_choice must be "none", "auto", "required" or {named}')
        return "function", holder["name"]
    if choice not in OPENAI_CHOICES:
        raise InvalidArgument(f'tool_choice must be "none", "auto", "required" or a function, got {choice!r}')
    return choice, ""


def parallel_tool_calls(body: dict[str, Any]) -> bool | None:
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidArgument("parallel_tool_calls must be a boolean")
    return parallel


def json_format(kind: str, schema: str) -> str:
    """A json_schema format without a schema asks for any JSON object."""
    return "json_object" if kind == "json_schema" and not schema else kind
