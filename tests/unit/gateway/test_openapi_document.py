"""tools/openapi.py over the real descriptor set (build/parley.pb): every routed binding becomes an
operation, and the schemas say what Envoy's transcoder prints (its print options)."""

from __future__ import annotations

from typing import Any

import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from services.gateway.envoy_config import PUBLIC_SERVICES
from tools import openapi, openapi_openai


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.build(openapi.DESCRIPTOR.read_bytes())


def component(document: dict[str, Any], name: str) -> dict[str, Any]:
    return document["components"]["schemas"][name]


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(OPENAPI_31).iter_errors(document))
    assert not errors, [e.message for e in errors[:5]]


def test_every_routed_binding_is_an_operation_and_internal_ones_are_not(document: dict[str, Any]) -> None:
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(openapi.DESCRIPTOR.read_bytes())
    routed = {name for names in PUBLIC_SERVICES.values() for name in names}
    expected = set()
    for file in files.file:
        for service in file.service:
            if f"{file.package}.{service.name}" not in routed:
                continue
            for method in service.method:
                if method.options.HasExtension(annotations_pb2.http) and not method.client_streaming:
                    expected.add(method.name[0].lower() + method.name[1:])
    operations = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(operations) == len(set(operations))
    assert expected == set(operations) - {"healthz", "getOpenApi"}
    assert not [p for p in document["paths"] if p.startswith("/internal")]


def test_schemas_follow_the_transcoders_print_options(document: dict[str, Any]) -> None:
    stats = component(document, "parley.cache.v1.GetCacheStatsResponse")
    assert stats["properties"]["hits"]["type"] == "string"  # int64 prints as a string
    assert "hits" in stats["required"] and "degraded" in stats["required"]  # zero values printed too
    session = component(document, "parley.session.v1.Session")
    assert "sampling" not in session["required"]  # message fields only when set
    assert session["properties"]["create_time"]["format"] == "date-time"
    sampling = component(document, "parley.inference.v1.SamplingParams")
    assert "temperature" not in sampling.get("required", [])  # `optional`: only when set
    assert "stop" in sampling["required"] and "logit_bias" in sampling["required"]  # [] and {} printed
    assert sampling["properties"]["logit_bias"]["propertyNames"] == {"pattern": "^-?[0-9]+$"}
    state = component(document, "parley.inference.v1.ModelState")
    assert state["enum"][0] == "MODEL_STATE_UNSPECIFIED" and "`MODEL_STATE_FAILED`: The last load failed" in \
        state["description"]
    # Requests need nothing and take 64-bit integers as numbers or strings.
    key = document["paths"]["/v1/api-keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "required" not in key and {"type": "integer", "format": "int64"} in key["properties"]["ttl_seconds"]["anyOf"]


def test_oneof_members_are_optional_and_exclusive(document: dict[str, Any]) -> None:
    event = component(document, "parley.session.v1.ChatResponse")
    assert "required" not in event
    assert {"required": ["start", "delta"]} in event["not"]["anyOf"]


def test_bindings_become_paths_parameters_and_bodies(document: dict[str, Any]) -> None:
    paths = document["paths"]
    patch = paths["/v1/sessions/{id}"]["patch"]  # bound as {session.id}: one path with GET and DELETE
    assert {p["name"]: p["in"] for p in patch["parameters"]} == {"id": "path", "update_mask": "query"}
    assert patch["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("Session.input")
    generate = paths["/v1/models/{model}:generate"]["post"]
    body = generate["requestBody"]["content"]["application/json"]["schema"]
    assert "model" not in body["properties"] and "messages" in body["properties"]  # the path's field is not the body's
    assert "text/event-stream" in generate["responses"]["200"]["content"]
    assert paths["/v1/auth/login"]["post"]["security"] == [] and "security" not in paths["/v1/users/me"]["get"]
    assert generate["description"].startswith("Streams the completion of a chat")
    assert generate["responses"]["400"]["$ref"].endswith("/OpenAIError400")  # /v1/models… errors in OpenAI's shape
    assert paths["/v1/sessions"]["get"]["responses"]["429"]["$ref"].endswith("/Error429")


def test_a_new_httpbody_method_must_be_described_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    operations = dict(openapi_openai.OPERATIONS)
    del operations["/parley.inference.v1.InferenceService/CreateEmbedding"]
    monkeypatch.setattr(openapi_openai, "OPERATIONS", operations)
    with pytest.raises(SystemExit, match="CreateEmbedding"):
        openapi.build(openapi.DESCRIPTOR.read_bytes())
