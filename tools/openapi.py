"""Writes the OpenAPI 3.1 document of Parley's REST API from the descriptor set Envoy's transcoder
reads (build/parley.pb), so the document describes exactly what the gateway serves.

    python tools/openapi.py            # build/parley.pb -> build/openapi.json (tools/gen.py runs it)

What comes from the protos: every `google.api.http` binding of the services the gateway routes
(services.gateway.envoy_config.PUBLIC_SERVICES) with its path, query and body parameters; the
messages and enums as schemas, with the proto comments as descriptions; which operations need a
bearer credential (services.core.identity.PUBLIC_METHODS lists those that do not). Schemas follow
the JSON the transcoder really prints (envoy_config's print options): snake_case names, every
non-`optional` scalar, repeated and map field present, message fields and `optional` scalars only
when set, 64-bit integers as strings, enums by name. Request schemas (suffix `.input`) require
nothing: a missing field is its zero value.

What is described by hand (tools/openapi_openai.py, tools/openapi_anthropic.py): the OpenAI- and
Anthropic-compatible methods, whose bodies are google.api.HttpBody passed through verbatim. A new HttpBody method without a description there
stops the generator.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: tools/ is on the path, the repository is not
    sys.path.insert(0, str(ROOT))

from google.api import annotations_pb2, http_pb2  # noqa: E402  (registers the http option)
from google.protobuf import descriptor_pb2  # noqa: E402

from services.core.identity import PUBLIC_METHODS  # noqa: E402
from services.gateway.envoy_config import ANTHROPIC_PATH_PREFIXES, OPENAI_PATH_PREFIXES, PUBLIC_SERVICES  # noqa: E402
from tools import openapi_anthropic, openapi_openai  # noqa: E402

DESCRIPTOR = ROOT / "build" / "parley.pb"
OUTPUT = ROOT / "build" / "openapi.json"

F = descriptor_pb2.FieldDescriptorProto
INT64_TYPES = {F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64}
INT32_TYPES = {F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32}
UINT32_TYPES = {F.TYPE_UINT32, F.TYPE_FIXED32}

# Well-known types in proto3's JSON mapping.
WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time",
                                   "description": "RFC 3339, UTC (\"Z\"), up to nanoseconds."},
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    ".google.protobuf.FieldMask": {"type": "string",
                                   "description": "Field paths separated by commas, e.g. `title,system_prompt`."},
    ".google.protobuf.Empty": {"type": "object"},
    ".google.protobuf.Struct": {"type": "object"},
    ".google.protobuf.Value": {},
}

# Statuses every operation may answer, with what they mean here (docs/architecture.md, Errors).
ERROR_STATUSES = {
    "400": "The request is not valid: the message names the field or limit.",
    "401": "No credential, or one that is not valid (expired, revoked, unknown).",
    "403": "The credential is valid but lacks the role this needs.",
    "404": "No such resource, or not the caller's.",
    "409": "A conflicting operation is running (e.g. another turn of the same session).",
    "413": "The request body is larger than the gateway accepts.",
    "414": "The URL is longer than the gateway accepts.",
    "429": "A rate limit, the generation queue or the memory budget is full, or a token budget is used up "
           "(OpenAI's code `insufficient_quota`); `Retry-After` says when to retry.",
    "503": "A service this needs is not available (starting, restarting, or its dependency is down); retry later.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}

NATIVE_ERROR = {
    "type": "object",
    "description": "A gRPC status as JSON: the numeric code (3 INVALID_ARGUMENT, 5 NOT_FOUND, 8 "
                   "RESOURCE_EXHAUSTED, 16 UNAUTHENTICATED…) and a message for people.",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {}},
    },
}
OPENAI_ERROR = {
    "type": "object",
    "description": "OpenAI's error shape, so that OpenAI SDKs raise their typed errors.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "examples": ["invalid_request_error", "rate_limit_error"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _clean_comment(text: str) -> str:
    """A proto comment as a description: lint directives and AIP notes left out."""
    lines = [line.strip() for line in text.strip().splitlines()]
    kept = [line for line in lines if not line.startswith(("buf:lint:", "AIP-"))]
    return " ".join(line for line in kept if line).strip()


class Protos:
    """The descriptor set: messages, enums and services by full name, with their comments."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
        self.comments: dict[tuple[str, ...], str] = {}
        for file in files.file:
            located = {tuple(loc.path): _clean_comment(loc.leading_comments)
                       for loc in file.source_code_info.location if loc.leading_comments.strip()}
            prefix = f".{file.package}" if file.package else ""
            for i, message in enumerate(file.message_type):
                self._message(message, prefix, (4, i), located)
            for i, enum in enumerate(file.enum_type):
                self._enum(enum, prefix, (5, i), located)
            for i, service in enumerate(file.service):
                name = f"{file.package}.{service.name}"
                self.services[name] = service
                self._comment(("service", name), located.get((6, i)))
                for j, method in enumerate(service.method):
                    self._comment(("method", name, method.name), located.get((6, i, 2, j)))

    def _comment(self, key: tuple[str, ...], text: str | None) -> None:
        if text:
            self.comments[key] = text

    def _message(self, message: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...],
                 located: dict[tuple[int, ...], str]) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        self._comment(("message", name), located.get(path))
        for j, field in enumerate(message.field):
            self._comment(("field", name, field.name), located.get((*path, 2, j)))
        for j, nested in enumerate(message.nested_type):
            self._message(nested, name, (*path, 3, j), located)
        for j, enum in enumerate(message.enum_type):
            self._enum(enum, name, (*path, 4, j), located)

    def _enum(self, enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...],
              located: dict[tuple[int, ...], str]) -> None:
        name = f"{prefix}.{enum.name}"
        self.enums[name] = enum
        self._comment(("enum", name), located.get(path))
        for j, value in enumerate(enum.value):
            self._comment(("value", name, value.name), located.get((*path, 2, j)))


def _component(full_name: str, output: bool) -> str:
    return full_name.lstrip(".") + ("" if output else ".input")


def _ref(full_name: str, output: bool) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{_component(full_name, output)}"}


class Schemas:
    """Component schemas, built on first use: `<message>` as the transcoder prints it and
    `<message>.input` as it parses it."""

    def __init__(self, protos: Protos) -> None:
        self.protos = protos
        self.components: dict[str, Any] = {}

    def ref(self, full_name: str, output: bool) -> dict[str, Any]:
        if full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[full_name])
        if full_name == ".google.api.HttpBody":
            raise ValueError("google.api.HttpBody has no schema of its own (tools/openapi_openai.py)")
        key = _component(full_name, output)
        if key not in self.components:
            self.components[key] = {}  # recursion guard; filled below
            if full_name in self.protos.enums:
                self.components[key] = self._enum(full_name, output)
            else:
                self.components[key] = self.message(full_name, output)
        return _ref(full_name, output)

    def _enum(self, full_name: str, output: bool) -> dict[str, Any]:
        enum = self.protos.enums[full_name]
        names = [v.name for v in enum.value]
        lines = [self.protos.comments.get(("enum", full_name), "")]
        for value in enum.value:
            said = self.protos.comments.get(("value", full_name, value.name))
            if said:
                lines.append(f"`{value.name}`: {said}")
        schema: dict[str, Any] = {"type": "string", "enum": names, "title": enum.name}
        if not output:
            # The transcoder parses names in any case (case_insensitive_enum_parsing) and numbers.
            schema = {"title": enum.name, "anyOf": [{"type": "string", "enum": names},
                                                    {"type": "integer", "enum": [v.number for v in enum.value]}]}
        description = " ".join(line for line in lines if line)
        if description:
            schema["description"] = description
        return schema

    def message(self, full_name: str, output: bool, leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The object schema of a message (fields in `leave_out` omitted: they come from the path)."""
        message = self.protos.messages[full_name]
        properties: dict[str, Any] = {}
        required: list[str] = []
        oneofs: dict[int, list[str]] = {}
        for field in message.field:
            if field.name in leave_out:
                continue
            schema = self.field(full_name, field, output)
            said = self.protos.comments.get(("field", full_name, field.name))
            if said:
                schema = {**schema, "description": said}  # beside a $ref too: OpenAPI 3.1 allows it
            if field.options.deprecated:
                schema["deprecated"] = True
            properties[field.name] = schema
            in_oneof = field.HasField("oneof_index") and not field.proto3_optional
            if in_oneof:
                oneofs.setdefault(field.oneof_index, []).append(field.name)
            # always_print_primitive_fields: scalars, enums, repeated and maps without presence are
            # printed even when empty; message fields, oneof members and `optional` ones only when set.
            printed = field.label == F.LABEL_REPEATED or (field.type != F.TYPE_MESSAGE and not field.HasField("oneof_index"))
            if output and printed:
                required.append(field.name)
        schema: dict[str, Any] = {"type": "object", "title": message.name, "properties": properties}
        if required:
            schema["required"] = required
        description = self.protos.comments.get(("message", full_name), "")
        for members in oneofs.values():
            said = f"At most one of {', '.join(f'`{m}`' for m in members)}."
            description = f"{description} {said}".strip()
            if output:
                # The transcoder prints the member that is set, and only it.
                schema.setdefault("not", {"anyOf": []})
                for i, a in enumerate(members):
                    for b in members[i + 1:]:
                        schema["not"]["anyOf"].append({"required": [a, b]})
        if description:
            schema["description"] = description
        return schema

    def field(self, owner: str, field: descriptor_pb2.FieldDescriptorProto, output: bool) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            nested = self.protos.messages.get(field.type_name)
            if nested is not None and nested.options.map_entry:
                key, value = nested.field
                schema: dict[str, Any] = {"type": "object", "additionalProperties": self.scalar(value, output)}
                if key.type in INT32_TYPES | UINT32_TYPES | INT64_TYPES:
                    schema["propertyNames"] = {"pattern": "^-?[0-9]+$"}
                return schema
        schema = self.scalar(field, output)
        if field.label == F.LABEL_REPEATED:
            return {"type": "array", "items": schema}
        return schema

    def scalar(self, field: descriptor_pb2.FieldDescriptorProto, output: bool) -> dict[str, Any]:
        kind = field.type
        if kind in (F.TYPE_MESSAGE, F.TYPE_ENUM):
            return self.ref(field.type_name, output)
        if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return {"type": "number", "format": "double" if kind == F.TYPE_DOUBLE else "float"}
        if kind in INT64_TYPES:
            unsigned = kind in (F.TYPE_UINT64, F.TYPE_FIXED64)
            text = {"type": "string", "pattern": "^[0-9]+$" if unsigned else "^-?[0-9]+$",
                    "format": "uint64" if unsigned else "int64"}
            # Printed as strings (JavaScript numbers lose 64-bit precision); parsed from either.
            return text if output else {"anyOf": [text, {"type": "integer", "format": text["format"]}]}
        if kind in INT32_TYPES:
            return {"type": "integer", "format": "int32", "minimum": -2**31, "maximum": 2**31 - 1}
        if kind in UINT32_TYPES:
            return {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
        if kind == F.TYPE_BOOL:
            return {"type": "boolean"}
        if kind == F.TYPE_STRING:
            return {"type": "string"}
        if kind == F.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        raise ValueError(f"unsupported field type {kind} of {field.name}")


PATH_VARIABLE = re.compile(r"\{([a-z0-9_.]+)(=[^}]*)?\}")


def _openapi_path(template: str) -> str:
    """The path with each variable named by its last field name: OpenAPI takes /v1/sessions/{id}
    and /v1/sessions/{session.id} for the same path, so they must share a name."""
    return PATH_VARIABLE.sub(lambda m: "{" + m.group(1).rsplit(".", 1)[-1] + "}", template)


def _binding(rule: http_pb2.HttpRule) -> tuple[str, str]:
    for verb in ("get", "post", "patch", "put", "delete"):
        path = getattr(rule, verb)
        if path:
            return verb, path
    raise ValueError(f"unsupported HTTP rule {rule}")


def _field_at(protos: Protos, message: str, dotted: str) -> tuple[str, descriptor_pb2.FieldDescriptorProto]:
    """The field a dotted path names, and the message that holds it."""
    *parents, last = dotted.split(".")
    for part in parents:
        holder = next(f for f in protos.messages[message].field if f.name == part)
        message = holder.type_name
    return message, next(f for f in protos.messages[message].field if f.name == last)


def _query_parameters(schemas: Schemas, message: str, taken: set[str], prefix: str = "",
                      depth: int = 0) -> Iterator[dict[str, Any]]:
    """Every field not bound elsewhere, as the transcoder reads it from the query: scalars and
    repeated scalars by name, fields of nested messages as `parent.child`."""
    for field in schemas.protos.messages[message].field:
        name = prefix + field.name
        if name in taken:
            continue
        nested = schemas.protos.messages.get(field.type_name) if field.type == F.TYPE_MESSAGE else None
        if nested is not None and field.type_name not in WELL_KNOWN:
            if field.label != F.LABEL_REPEATED and depth < 2 and not nested.options.map_entry:
                yield from _query_parameters(schemas, field.type_name, taken, f"{name}.", depth + 1)
            continue
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": False,
                                     "schema": schemas.field(message, field, output=False)}
        if field.label == F.LABEL_REPEATED:
            parameter.update(style="form", explode=True)
        said = schemas.protos.comments.get(("field", message, field.name))
        if said:
            parameter["description"] = said
        yield parameter


def error_responses() -> dict[str, Any]:
    """components/responses: each error status in each shape (`Error400`, `OpenAIError400`,
    `AnthropicError400`…)."""
    responses: dict[str, Any] = {}
    for shape in ("Error", "OpenAIError", "AnthropicError"):
        for status, meaning in ERROR_STATUSES.items():
            answer: dict[str, Any] = {"description": meaning, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}}
            if status in ("429", "503"):
                answer["headers"] = RETRY_AFTER
            responses[f"{shape}{status}"] = answer
    return responses


def _errors(path: str) -> dict[str, Any]:
    shape = ("AnthropicError" if path.startswith(ANTHROPIC_PATH_PREFIXES)
             else "OpenAIError" if path.startswith(OPENAI_PATH_PREFIXES) else "Error")
    return {status: {"$ref": f"#/components/responses/{shape}{status}"} for status in ERROR_STATUSES}


def operations(protos: Protos, schemas: Schemas) -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}
    for names in PUBLIC_SERVICES.values():
        for service_name in names:
            service = protos.services[service_name]
            tag = service.name
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                if method.client_streaming:
                    continue  # the transcoder does not take client streams from REST
                rule = method.options.Extensions[annotations_pb2.http]
                verb, template = _binding(rule)
                full_method = f"/{service_name}/{method.name}"
                operation = _operation(protos, schemas, service_name, method, rule, template, full_method, tag)
                path = _openapi_path(template)
                if verb in paths.setdefault(path, {}):
                    raise ValueError(f"two RPCs bind {verb.upper()} {path}")
                paths[path][verb] = operation
    return dict(sorted(paths.items()))


def _operation(protos: Protos, schemas: Schemas, service_name: str, method: descriptor_pb2.MethodDescriptorProto,
               rule: http_pb2.HttpRule, template: str, full_method: str, tag: str) -> dict[str, Any]:
    request = method.input_type
    operation_id = method.name[0].lower() + method.name[1:]
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [tag],
                                 "summary": re.sub(r"(?<!^)(?=[A-Z])", " ", method.name).capitalize()}
    said = protos.comments.get(("method", service_name, method.name))
    if said:
        operation["description"] = said
    if full_method in PUBLIC_METHODS:
        operation["security"] = []
    hand = openapi_openai.OPERATIONS.get(full_method) or openapi_anthropic.OPERATIONS.get(full_method)
    if full_method in openapi_anthropic.OPERATIONS:
        operation["security"] = [{"bearer": []}, {"apiKey": []}]

    parameters: list[dict[str, Any]] = []
    taken: set[str] = set()
    for variable in PATH_VARIABLE.finditer(template):
        dotted = variable.group(1)
        holder, field = _field_at(protos, request, dotted)
        taken.add(dotted)
        parameter = {"name": field.name, "in": "path", "required": True,
                     "schema": {**schemas.field(holder, field, output=False), "minLength": 1}}
        said = protos.comments.get(("field", holder, field.name), "")
        if "." in dotted:
            said = f"{said} The body's `{dotted}` (the path's value wins).".strip()
        if said:
            parameter["description"] = said
        if hand and dotted in hand.get("path_examples", {}):
            parameter["examples"] = {"default": {"value": hand["path_examples"][dotted]}}
        parameters.append(parameter)

    if rule.body == "*":
        top = {t for t in taken if "." not in t}
        body_schema = schemas.message(request, output=False, leave_out=frozenset(top))
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    elif rule.body:
        taken.add(rule.body)
        holder, field = _field_at(protos, request, rule.body)
        if field.type_name == ".google.api.HttpBody":
            if not hand or "request" not in hand:
                raise SystemExit(f"openapi: {full_method} takes a google.api.HttpBody: describe its request in "
                                 "tools/openapi_openai.py")
            operation["requestBody"] = hand["request"]
        else:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": schemas.ref(field.type_name, False)}}}
    if not rule.body == "*":
        parameters.extend(_query_parameters(schemas, request, taken))
    if parameters:
        operation["parameters"] = parameters

    responses: dict[str, Any]
    if method.output_type == ".google.api.HttpBody":
        if not hand or "responses" not in hand:
            raise SystemExit(f"openapi: {full_method} answers a google.api.HttpBody: describe its responses in "
                             "tools/openapi_openai.py")
        responses = dict(hand["responses"])
    elif method.server_streaming:
        responses = {"200": {
            "description": "Server-sent events, one `data: <JSON>` per message, sent as they are produced.",
            "content": {"text/event-stream": {"schema": openapi_openai.sse_event(schemas.ref(method.output_type, True))}},
        }}
    else:
        responses = {"200": {"description": "OK", "content": {"application/json": {
            "schema": schemas.ref(method.output_type, True)}}}}
    path = _openapi_path(template)
    responses.update(_errors(path))
    operation["responses"] = responses
    return operation


def build(descriptor_set: bytes) -> dict[str, Any]:
    protos = Protos(descriptor_pb2.FileDescriptorSet.FromString(descriptor_set))
    schemas = Schemas(protos)
    paths = operations(protos, schemas)
    paths.update(openapi_openai.EXTRA_PATHS)
    components = dict(sorted(schemas.components.items()))
    components.update(Error=NATIVE_ERROR, OpenAIError=OPENAI_ERROR, **openapi_openai.SCHEMAS,
                      **openapi_anthropic.SCHEMAS)
    tags = [{"name": protos.services[name].name,
             "description": protos.comments.get(("service", name), "")}
            for names in PUBLIC_SERVICES.values() for name in names]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Parley",
            "version": "v1",
            "description": "Parley's REST API as the Envoy gateway serves it: the native API (transcoded from "
                           "gRPC; errors as `{\"code\", \"message\"}`), the OpenAI-compatible paths (errors "
                           "in OpenAI's shape) and Anthropic's Messages API (errors in Anthropic's shape). "
                           "Generated from protos/ by tools/openapi.py.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": error_responses(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A JWT access token (POST /v1/auth/login) or an API key "
                                                          "(POST /v1/api-keys)."},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                           "description": "The same credentials, as Anthropic's clients send them."}},
        },
    }


def write(descriptor: Path = DESCRIPTOR, output: Path = OUTPUT) -> dict[str, Any]:
    document = build(descriptor.read_bytes())
    output.write_text(json.dumps(document, separators=(",", ":"), ensure_ascii=False) + "\n")
    return document


def main() -> None:
    document = write()
    count = sum(len(p) for p in document["paths"].values())
    print(f"openapi: {count} operations -> {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
