"""The OpenAPI description of Anthropic's Messages API as Parley serves it (tools/openapi.py merges it
with tools/openapi_openai.py): the service reads and writes these bodies itself
(services/wire/anthropic.py, anthropic_stream.py), so their shapes are written here, by
hand, as those modules accept and answer them."""

from __future__ import annotations

from typing import Any

from tools.openapi_openai import (
    BOOLEAN, INTEGER, MODEL, NUMBER, STRING, STRINGS, _json_body, _nullable, _ref, sse_event,
)

ERROR = {
    "type": "object",
    "description": "Anthropic's error shape, so that Anthropic's SDKs raise their typed errors.",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"], "properties": {
            "type": {"type": "string", "examples": ["invalid_request_error", "authentication_error", "not_found_error",
                                                    "rate_limit_error", "overloaded_error", "api_error"]},
            "message": STRING}},
    },
}

TEXT_BLOCK = {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": STRING}}
TOOL_USE = {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
    "type": {"const": "tool_use"}, "id": STRING, "name": STRING, "input": {"type": "object"}}}
TOOL_RESULT = {"type": "object", "required": ["type", "tool_use_id"], "properties": {
    "type": {"const": "tool_result"}, "tool_use_id": STRING,
    "content": {"anyOf": [STRING, {"type": "array", "items": TEXT_BLOCK}]}, "is_error": BOOLEAN}}
THINKING = {"type": "object", "required": ["type", "thinking"], "properties": {
    "type": {"const": "thinking"}, "thinking": STRING, "signature": STRING}}
INPUT_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"enum": ["user", "assistant"]},
    "content": {"anyOf": [STRING, {"type": "array",
                                   "items": {"anyOf": [TEXT_BLOCK, TOOL_USE, TOOL_RESULT, THINKING]}}]},
}}
TOOL = {"type": "object", "required": ["name", "input_schema"], "properties": {
    "name": {**STRING, "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": STRING,
    "input_schema": {"type": "object", "description": "A JSON Schema of the tool's input."}}}
PROMPT = {
    "model": {**STRING, "minLength": 1, "description": "A chat model's id (GET /v1/models).", "examples": [MODEL]},
    "system": {"anyOf": [STRING, {"type": "array", "items": TEXT_BLOCK}]},
    "messages": {"type": "array", "minItems": 1, "items": INPUT_MESSAGE},
    "tools": {"type": "array", "items": TOOL},
    "tool_choice": {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["auto", "any", "tool", "none"]}, "name": STRING, "disable_parallel_tool_use": BOOLEAN}},
    "thinking": {"type": "object", "required": ["type"], "description": "\"disabled\" turns a reasoning model's "
                 "thinking off; without it the model's default holds.", "properties": {
                     "type": {"enum": ["enabled", "disabled"]}, "budget_tokens": {**INTEGER, "minimum": 1}}},
}
REQUEST = {
    "type": "object",
    "description": "Anthropic's Messages request. Unknown fields are ignored.",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        **PROMPT,
        "max_tokens": {**INTEGER, "minimum": 1, "maximum": 1_000_000},
        "stream": {**BOOLEAN, "default": False},
        "temperature": {**NUMBER, "minimum": 0, "maximum": 2},
        "top_p": {**NUMBER, "minimum": 0, "maximum": 1},
        "top_k": {**INTEGER, "minimum": 0, "maximum": 1000},
        "stop_sequences": {**STRINGS, "maxItems": 8},
        "metadata": {"type": "object", "properties": {"user_id": STRING}},
    },
}
COUNT_REQUEST = {"type": "object", "description": "A Messages request's prompt parts.",
                 "required": ["model", "messages"], "properties": PROMPT}
USAGE = {"type": "object", "required": ["input_tokens", "output_tokens"],
         "properties": {"input_tokens": INTEGER, "output_tokens": INTEGER}}
MESSAGE = {
    "type": "object",
    "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
    "properties": {
        "id": {**STRING, "pattern": "^msg_"}, "type": {"const": "message"}, "role": {"const": "assistant"},
        "model": STRING,
        "content": {"type": "array", "items": {"anyOf": [TEXT_BLOCK, TOOL_USE, THINKING]}},
        "stop_reason": _nullable({"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]}),
        "stop_sequence": _nullable(STRING),
        "usage": USAGE,
    },
}
STREAM_EVENT = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                      "message_delta", "message_stop", "ping", "error"]}}}

SCHEMAS: dict[str, Any] = {
    "AnthropicError": ERROR,
    "anthropic.MessageRequest": REQUEST,
    "anthropic.CountTokensRequest": COUNT_REQUEST,
    "anthropic.Message": MESSAGE,
    "anthropic.StreamEvent": STREAM_EVENT,
    "anthropic.TokenCount": {"type": "object", "required": ["input_tokens"], "properties": {"input_tokens": INTEGER}},
}

EXAMPLE = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "Hello!"}]}
OPERATIONS: dict[str, dict[str, Any]] = {
    "/parley.inference.v1.InferenceService/CreateMessage": {
        "request": _json_body(_ref("anthropic.MessageRequest"), "Anthropic's request JSON.", EXAMPLE),
        "responses": {"200": {
            "description": "`stream: false`: the Message as JSON. `stream: true`: Anthropic's server-sent events "
                           "(`event: message_start` … `event: message_stop`, `ping` while queued); an error after "
                           "the first event arrives as `event: error`.",
            "content": {"application/json": {"schema": _ref("anthropic.Message")},
                        "text/event-stream": {"schema": sse_event(
                            {"anyOf": [_ref("anthropic.StreamEvent"), _ref("AnthropicError")]}, named=True)}}}},
    },
    "/parley.inference.v1.InferenceService/CountMessageTokens": {
        "request": _json_body(_ref("anthropic.CountTokensRequest"), "Anthropic's request JSON.",
                              {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}),
        "responses": {"200": {"description": "The prompt's tokens.",
                              "content": {"application/json": {"schema": _ref("anthropic.TokenCount")}}}},
    },
}
