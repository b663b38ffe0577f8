"""The parts of the OpenAPI document that the protos cannot say (tools/openapi.py builds the rest).

The OpenAI-compatible methods take and answer google.api.HttpBody: the service reads OpenAI's JSON
itself (services/wire/openai_chat.py, openai_text.py, openai_responses.py and
services/inference/endpoints/embeddings.py), so their shapes are written here, by hand, as those
modules accept and answer them. Responses list the fields Parley always sends as required;
OpenAI's objects may grow fields, so none of them forbids more.

OPERATIONS is keyed by gRPC method (`/package.Service/Method`): `request` (a requestBody object),
`responses` (the success answers), `path_examples` (a working value per path parameter).
"""

from __future__ import annotations

from typing import Any

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _json_body(schema: dict[str, Any], description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "description": description,
            "content": {"application/json": {"schema": schema, "examples": {"hello": {"value": example}}}}}


def sse_event(data: dict[str, Any], *, done: bool = False, named: bool = False) -> dict[str, Any]:
    """One server-sent event whose `data` is JSON of schema `data` (`[DONE]` too when `done`): the
    event's schema, as OpenAPI 3.2's itemSchema says it (3.1 has no word for streams; tools such as
    Schemathesis read a `text/event-stream` schema per event)."""
    payload: dict[str, Any] = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    if done:
        payload = {"anyOf": [{"const": "[DONE]"}, payload]}
    event: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {"data": payload}}
    if named:
        event["required"].append("event")
        event["properties"]["event"] = {"type": "string"}
    return event


def _stream_or_json(json_schema: str, event_schema: str, what: str) -> dict[str, Any]:
    chunk = {"anyOf": [_ref(event_schema), _ref("OpenAIError")]}
    return {"200": {
        "description": f"`stream: false`: {what} as JSON. `stream: true`: OpenAI's server-sent events, one "
                       "`data: <JSON>` per chunk, ending with `data: [DONE]`; an error after the first chunk "
                       "arrives as a last chunk of OpenAI's error shape.",
        "content": {
            "application/json": {"schema": _ref(json_schema)},
            "text/event-stream": {"schema": sse_event(chunk, done=True)},
        },
    }}


INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
STRINGS = {"type": "array", "items": STRING}

# Sampling parameters shared by chat and legacy completions (services/core/sampling.py checks them).
SAMPLING: dict[str, Any] = {
    "model": {**STRING, "description": "A chat model's id; empty or absent means the default model.",
              "examples": [MODEL]},
    "stream": {**BOOLEAN, "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": BOOLEAN}},
    "max_tokens": {**INTEGER, "minimum": 1, "maximum": 1_000_000},
    "temperature": {**NUMBER, "minimum": 0, "maximum": 2},
    "top_p": {**NUMBER, "minimum": 0, "maximum": 1},
    "top_k": {**INTEGER, "minimum": 0, "maximum": 1000, "description": "Parley's extension."},
    "min_p": {**NUMBER, "minimum": 0, "maximum": 1, "description": "Parley's extension."},
    "repetition_penalty": {**NUMBER, "minimum": 0.5, "maximum": 2, "description": "Parley's extension."},
    "presence_penalty": {**NUMBER, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**NUMBER, "minimum": -2, "maximum": 2},
    "seed": {**INTEGER, "description": "Repeatable sampling; taken modulo 2^32."},
    "n": {**INTEGER, "minimum": 1, "maximum": 16, "default": 1},
    "stop": {"anyOf": [STRING, {**STRINGS, "maxItems": 8}]},
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                   "additionalProperties": {**NUMBER, "minimum": -100, "maximum": 100}},
    "user": STRING,
}

TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"const": "text"}, "text": STRING}}
TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": STRING, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": STRING, "arguments": {**STRING, "description": "A JSON object, as text."}}},
}}
CHAT_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [STRING, {"type": "array", "items": TEXT_PART}, {"type": "null"}]},
    "name": STRING,
    "tool_calls": {"type": "array", "items": TOOL_CALL},
    "tool_call_id": STRING,
}}
FUNCTION_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {**STRING, "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": STRING,
        "parameters": {"type": "object", "description": "A JSON Schema of the arguments."},
        "strict": BOOLEAN}},
}}

CHAT_REQUEST = {
    "type": "object",
    "description": "OpenAI's chat completion request. Unknown fields are ignored.",
    "required": ["messages"],
    "properties": {
        **SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": CHAT_MESSAGE},
        "max_completion_tokens": {**INTEGER, "minimum": 1, "maximum": 1_000_000,
                                  "description": "Takes precedence over max_tokens."},
        "logprobs": BOOLEAN,
        "top_logprobs": {**INTEGER, "minimum": 0, "maximum": 20, "description": "Needs logprobs: true."},
        "tools": {"type": "array", "items": FUNCTION_TOOL},
        "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]},
                                  {"type": "object", "required": ["type", "function"], "properties": {
                                      "type": {"const": "function"},
                                      "function": {"type": "object", "required": ["name"],
                                                   "properties": {"name": STRING}}}}]},
        "parallel_tool_calls": BOOLEAN,
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "required": ["name"],
                            "properties": {"name": STRING, "schema": {"type": "object"}, "strict": BOOLEAN}}}},
        "chat_template_kwargs": {"type": "object", "description": "Extra variables for the model's chat template "
                                 "(e.g. {\"enable_thinking\": false}); request variables cannot be replaced."},
        "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high"],
                             "description": "\"none\" turns a reasoning model's thinking off."},
    },
}

USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER,
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": INTEGER}},
    "completion_tokens_details": {"type": "object", "properties": {"reasoning_tokens": INTEGER}},
}}
FINISH = _nullable({"enum": ["stop", "length", "tool_calls", "content_filter"]})
LOGPROBS = _nullable({"type": "object"})
COMPLETION_HEAD = {"id": STRING, "created": INTEGER, "model": STRING, "system_fingerprint": STRING}

CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        **COMPLETION_HEAD,
        "object": {"const": "chat.completion"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "message", "finish_reason"], "properties": {
                "index": INTEGER,
                "message": {"type": "object", "required": ["role", "content"], "properties": {
                    "role": {"const": "assistant"}, "content": _nullable(STRING), "refusal": _nullable(STRING),
                    "reasoning_content": {**STRING, "description": "A reasoning model's thinking, apart."},
                    "tool_calls": {"type": "array", "items": TOOL_CALL}}},
                "logprobs": LOGPROBS,
                "finish_reason": FINISH}}},
        "usage": USAGE,
    },
}
CHAT_COMPLETION_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        **COMPLETION_HEAD,
        "object": {"const": "chat.completion.chunk"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "delta"], "properties": {
                "index": INTEGER,
                "delta": {"type": "object", "properties": {
                    "role": STRING, "content": _nullable(STRING), "reasoning_content": STRING,
                    "tool_calls": {"type": "array", "items": {"type": "object"}}}},
                "logprobs": LOGPROBS,
                "finish_reason": FINISH}}},
        "usage": _nullable(USAGE),
    },
}

TEXT_COMPLETION_REQUEST = {
    "type": "object",
    "description": "OpenAI's legacy completion request: a raw prompt, no chat template. Chat-only fields "
                   "(messages, tools, response_format…) are refused.",
    "required": ["prompt"],
    "properties": {
        **SAMPLING,
        "prompt": {"anyOf": [{**STRING, "minLength": 1}, {"type": "array", "minItems": 1,
                                                          "items": {**STRING, "minLength": 1}}]},
        "echo": BOOLEAN,
        "logprobs": {**INTEGER, "minimum": 0, "maximum": 5},
        "best_of": {**INTEGER, "description": "Only equal to n."},
    },
}
TEXT_CHOICE = {"type": "object", "required": ["index", "text", "finish_reason"], "properties": {
    "index": INTEGER, "text": STRING, "logprobs": LOGPROBS, "finish_reason": FINISH}}
TEXT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {**COMPLETION_HEAD, "object": {"const": "text_completion"},
                   "choices": {"type": "array", "items": TEXT_CHOICE}, "usage": _nullable(USAGE)},
}

TOKENS = {"type": "array", "items": {**INTEGER, "minimum": 0}, "minItems": 1}
EMBEDDING_REQUEST = {
    "type": "object",
    "description": "OpenAI's embeddings request.",
    "required": ["input"],
    "properties": {
        "model": {**STRING, "description": "An embedding model's id; empty means the default embedding model.",
                  "examples": [EMBEDDING_MODEL]},
        "input": {"anyOf": [STRING, {**STRINGS, "minItems": 1, "maxItems": 2048}, TOKENS,
                            {"type": "array", "items": TOKENS, "minItems": 1, "maxItems": 2048}]},
        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
        "dimensions": {**INTEGER, "minimum": 1, "description": "Only for models trained for shorter vectors."},
        "truncate": {**BOOLEAN, "default": False,
                     "description": "Parley's extension: cut inputs longer than the model takes."},
        "user": STRING,
    },
}
EMBEDDING_LIST = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                            "properties": {
                                                "object": {"const": "embedding"}, "index": INTEGER,
                                                "embedding": {"anyOf": [{"type": "array", "items": NUMBER},
                                                                        {**STRING, "contentEncoding": "base64"}]}}}},
        "model": STRING,
        "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                  "properties": {"prompt_tokens": INTEGER, "total_tokens": INTEGER}},
    },
}

RESPONSE_REQUEST = {
    "type": "object",
    "description": "OpenAI's Responses API request. A stored response is a turn of one of the caller's "
                   "sessions; previous_response_id continues it.",
    "required": ["input"],
    "properties": {
        "model": {**STRING, "examples": [MODEL]},
        "input": {"anyOf": [STRING, {"type": "array", "items": {"type": "object"}}],
                  "description": "A string, or items: messages ({role, content}) and function_call_output."},
        "instructions": _nullable(STRING),
        "previous_response_id": _nullable(STRING),
        "store": {**BOOLEAN, "default": True},
        "stream": {**BOOLEAN, "default": False},
        "temperature": _nullable({**NUMBER, "minimum": 0, "maximum": 2}),
        "top_p": _nullable({**NUMBER, "minimum": 0, "maximum": 1}),
        "max_output_tokens": _nullable({**INTEGER, "minimum": 1, "maximum": 1_000_000}),
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"anyOf": [STRING, {"type": "object"}]},
        "parallel_tool_calls": BOOLEAN,
        "text": {"type": "object", "properties": {"format": {"type": "object"}}},
        "reasoning": _nullable({"type": "object", "description": "effort \"none\" turns a reasoning model's "
                                "thinking off; its thinking is answered as a `reasoning` output item.",
                                "properties": {
                                    "effort": _nullable({"enum": ["none", "minimal", "low", "medium", "high", "xhigh",
                                                                  "max"]}),
                                    "summary": _nullable({"enum": ["auto", "concise", "detailed"]})}}),
        "metadata": _nullable({"type": "object", "additionalProperties": {**STRING, "maxLength": 512}}),
        "user": _nullable(STRING),
    },
}
RESPONSE_ITEM = {"type": "object", "required": ["type"], "properties": {"id": STRING, "type": STRING}}
RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output"],
    "properties": {
        "id": {**STRING, "pattern": "^resp_"},
        "object": {"const": "response"},
        "created_at": INTEGER,
        "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]},
        "error": _nullable({"type": "object"}),
        "incomplete_details": _nullable({"type": "object"}),
        "model": STRING,
        "output": {"type": "array", "items": RESPONSE_ITEM},
        "usage": _nullable({"type": "object"}),
        "previous_response_id": _nullable(STRING),
        "store": BOOLEAN,
    },
}
RESPONSE_EVENT = {"type": "object", "required": ["type", "sequence_number"],
                  "properties": {"type": {**STRING, "pattern": "^(response\\.|error$)"}, "sequence_number": INTEGER}}
RESPONSE_ITEMS = {
    "type": "object",
    "required": ["object", "data", "has_more"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": RESPONSE_ITEM},
                   "first_id": _nullable(STRING), "last_id": _nullable(STRING), "has_more": BOOLEAN},
}
RESPONSE_DELETED = {"type": "object", "required": ["id", "object", "deleted"],
                    "properties": {"id": STRING, "object": {"const": "response"}, "deleted": {"const": True}}}

SCHEMAS: dict[str, Any] = {
    "openai.ChatCompletionRequest": CHAT_REQUEST,
    "openai.ChatCompletion": CHAT_COMPLETION,
    "openai.ChatCompletionChunk": CHAT_COMPLETION_CHUNK,
    "openai.CompletionRequest": TEXT_COMPLETION_REQUEST,
    "openai.Completion": TEXT_COMPLETION,
    "openai.EmbeddingRequest": EMBEDDING_REQUEST,
    "openai.EmbeddingList": EMBEDDING_LIST,
    "openai.ResponseRequest": RESPONSE_REQUEST,
    "openai.Response": RESPONSE,
    "openai.ResponseStreamEvent": RESPONSE_EVENT,
    "openai.ResponseInputItems": RESPONSE_ITEMS,
    "openai.ResponseDeleted": RESPONSE_DELETED,
}


def _json(name: str, description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {"application/json": {"schema": _ref(name)}}}}


OPERATIONS: dict[str, dict[str, Any]] = {
    "/parley.inference.v1.InferenceService/CreateChatCompletion": {
        "request": _json_body(_ref("openai.ChatCompletionRequest"), "OpenAI's request JSON.",
                              {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}),
        "responses": _stream_or_json("openai.ChatCompletion", "openai.ChatCompletionChunk", "a chat.completion"),
    },
    "/parley.inference.v1.InferenceService/CreateCompletion": {
        "request": _json_body(_ref("openai.CompletionRequest"), "OpenAI's request JSON.",
                              {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16}),
        "responses": _stream_or_json("openai.Completion", "openai.Completion", "a text_completion"),
    },
    "/parley.inference.v1.InferenceService/CreateEmbedding": {
        "request": _json_body(_ref("openai.EmbeddingRequest"), "OpenAI's request JSON.",
                              {"model": EMBEDDING_MODEL, "input": ["Hello", "world"]}),
        "responses": _json("openai.EmbeddingList"),
    },
    "/parley.session.v1.SessionService/CreateResponse": {
        "request": _json_body(_ref("openai.ResponseRequest"), "OpenAI's request JSON.",
                              {"model": MODEL, "input": "Hello!", "max_output_tokens": 16}),
        "responses": {"200": {
            "description": "`stream: false`: the Response as JSON. `stream: true`: OpenAI's semantic events "
                           "(`event: response.created` … `response.completed`).",
            "content": {"application/json": {"schema": _ref("openai.Response")},
                        "text/event-stream": {"schema": sse_event(_ref("openai.ResponseStreamEvent"),
                                                                  named=True)}}}},
    },
    "/parley.session.v1.SessionService/GetResponse": {"responses": _json("openai.Response")},
    "/parley.session.v1.SessionService/DeleteResponse": {"responses": _json("openai.ResponseDeleted")},
    "/parley.session.v1.SessionService/ListResponseInputItems": {"responses": _json("openai.ResponseInputItems")},
    # Working values for path parameters (the fuzzer's first examples; documentation for people).
    "/parley.inference.v1.InferenceService/GetModel": {"path_examples": {"id": MODEL}},
    "/parley.inference.v1.InferenceService/Generate": {"path_examples": {"model": MODEL}},
    "/parley.inference.v1.InferenceService/CountTokens": {"path_examples": {"model": MODEL}},
    "/parley.inference.v1.InferenceService/Embed": {"path_examples": {"model": EMBEDDING_MODEL}},
}

# Paths served by the gateway itself, not by an RPC.
EXTRA_PATHS: dict[str, Any] = {
    "/healthz": {"get": {
        "operationId": "healthz", "tags": ["Gateway"], "summary": "Health", "security": [],
        "description": "200 when every service answers grpc.health.v1 SERVING, else 503 naming the others.",
        "responses": {
            "200": {"description": "Every service serves.", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status"], "properties": {"status": {"const": "SERVING"}}}}}},
            "503": {"description": "Some service does not serve.", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status", "unhealthy"],
                "properties": {"status": {"const": "NOT_SERVING"}, "unhealthy": STRINGS}}}}},
        },
    }},
    "/v1/openapi.json": {"get": {
        "operationId": "getOpenApi", "tags": ["Gateway"], "summary": "This document", "security": [],
        "responses": {"200": {"description": "The OpenAPI 3.1 document.",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
}
