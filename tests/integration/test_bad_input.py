"""Every malformed request issue 20 named (and the fuzzer found since), through Envoy: each is a 4xx
with a message that says what is wrong, and none names a Python class or a proto message."""

from __future__ import annotations

import json
import re
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from services.stack import Stack
from tests.integration.conftest import Caller

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
BIG = int("9" * 400)
DEEP = "[" * 100_000 + "]" * 100_000
# What a message must never show: exception classes, tracebacks, generated request types.
INTERNALS = re.compile(r"\w+(Error|Exception)\b|Traceback|google\.protobuf|parley\.\w+\.v1\.\w+|\bpb2\b")


def assert_clear_4xx(answer: httpx.Response, status: int | None = None, words: str = "") -> str:
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    if status is not None:
        assert answer.status_code == status, answer.text[:500]
    body = answer.json()
    message = body["error"]["message"] if "error" in body else body["message"]
    assert message and not INTERNALS.search(message), message
    assert words.lower() in message.lower(), message
    return message


@pytest.fixture(scope="module")
def http(stack: Stack, user: Caller) -> httpx.Client:
    with httpx.Client(base_url=stack.url, headers=user.headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def session_id(http: httpx.Client) -> str:
    created = http.post("/v1/sessions", json={"session": {"title": "bad input"}})
    assert created.status_code == 200, created.text
    return created.json()["id"]


def chat_body(**fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


# --- invalid UTF-8 in paths and queries, crafted page tokens ------------------------------------------

@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/sessions/%ff"),
    ("DELETE", "/v1/api-keys/%ff%fe"),
    ("GET", "/v1/sessions?page_token=%ff"),
    ("GET", "/v1/models/%ff%fe"),
    ("GET", "/v1/responses/%ff"),
])
def test_invalid_utf8_in_a_path_or_query_is_400(http: httpx.Client, method: str, path: str) -> None:
    assert_clear_4xx(http.request(method, path), 400, "UTF-8")


def test_invalid_utf8_in_an_admin_path_is_400(stack: Stack, admin: Caller) -> None:
    answer = httpx.post(f"{stack.url}/v1/models/%ff%fe:load", json={}, headers=admin.headers, timeout=30)
    assert_clear_4xx(answer, 400, "UTF-8")


def test_crafted_page_tokens_are_400(http: httpx.Client, session_id: str) -> None:
    assert_clear_4xx(http.get("/v1/sessions", params={"page_token": "WyJzIl0"}), 400, "page_token")
    assert_clear_4xx(http.get(f"/v1/sessions/{session_id}/messages", params={"page_token": "WyJtIiwiYWJjIl0"}),
                     400, "page_token")


# --- OpenAI bodies: wrong types and numbers out of range ---------------------------------------------

def test_a_role_that_is_not_a_string_is_400(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": ["user"], "content": "hi"}]}
    assert_clear_4xx(http.post("/v1/chat/completions", json=body), 400, "role")


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", "temperature", "seed", "top_k"])
def test_integers_of_400_digits_are_400_naming_the_field(http: httpx.Client, key: str) -> None:
    answer = http.post("/v1/chat/completions", content=json.dumps(chat_body(**{key: BIG})),
                       headers={"content-type": "application/json"})
    assert_clear_4xx(answer, 400, key)


@pytest.mark.parametrize("path,body", [
    ("/v1/sessions", {"session": {"sampling": {"max_tokens": BIG}}}),
    ("/v1/sessions", {"session": {"sampling": {"temperature": BIG}}}),
    (f"/v1/models/{MODEL}:generate", {"messages": [{"role": "user", "content": "hi"}], "sampling": {"seed": BIG}}),
])
def test_native_numbers_out_of_range_are_400(http: httpx.Client, path: str, body: dict) -> None:
    assert_clear_4xx(http.post(path, content=json.dumps(body), headers={"content-type": "application/json"}), 400)


# --- nesting ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"])
def test_100000_nested_brackets_on_openai_paths_are_400(http: httpx.Client, path: str) -> None:
    for body in (DEEP, '{"model": "m", "messages": ' + DEEP + "}", '{"input": ' + DEEP + "}"):
        answer = http.post(path, content=body, headers={"content-type": "application/json"})
        assert_clear_4xx(answer, 400, "deep")


@pytest.mark.parametrize("path", ["/v1/sessions", "/v1/sessions/{sid}:chat", f"/v1/models/{MODEL}:generate",
                                  f"/v1/models/{MODEL}:countTokens", f"/v1/models/{EMBEDDING_MODEL}:embed",
                                  "/v1/api-keys"])
def test_100000_nested_brackets_on_native_paths_are_400(http: httpx.Client, session_id: str, path: str) -> None:
    for body in (DEEP, '{"messages": ' + DEEP + "}"):
        answer = http.post(path.format(sid=session_id), content=body, headers={"content-type": "application/json"})
        assert_clear_4xx(answer, 400, "deep")


@pytest.mark.parametrize("path,body", [
    ("/v1/sessions/{sid}:chat", {"content": "hi", "structured": {"response_format": "json_schema",
                                                                  "json_schema": DEEP}}),
    ("/v1/sessions/{sid}:chat", {"content": "hi", "structured": {"tools": [{"name": "f", "parameters": DEEP}]}}),
    (f"/v1/models/{MODEL}:generate", {"messages": [{"role": "user", "content": "hi"}],
                                       "structured": {"response_format": "json_schema", "json_schema": DEEP}}),
    (f"/v1/models/{MODEL}:countTokens", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "name": "f", "arguments": DEEP}]}]}),
])
def test_json_nested_100000_deep_inside_a_text_field_is_400(http: httpx.Client, session_id: str, path: str,
                                                            body: dict) -> None:
    answer = http.post(path.format(sid=session_id), json=body)
    assert_clear_4xx(answer, 400, "nests too deeply")


def test_a_schema_just_within_the_depth_limit_is_served(http: httpx.Client) -> None:
    schema = '{"type":"array","items":' * 40 + '{"type":"string"}' + "}" * 40
    answer = http.post("/v1/chat/completions", content=json.dumps(chat_body(response_format={
        "type": "json_schema", "json_schema": {"name": "deep", "schema": json.loads(schema)}})),
        headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text


# --- the gateway -----------------------------------------------------------------------------------------

def _upgrade(stack: Stack, path: str, token: str) -> tuple[int, bytes]:
    """A WebSocket upgrade request, sent by hand (no client library asks for an upgrade of a path
    that is not a WebSocket)."""
    host, port = urlsplit(stack.url).hostname, urlsplit(stack.url).port
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Authorization: Bearer {token}\r\n\r\n")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _length(data: bytes) -> int:
    match = re.search(rb"content-length: *(\d+)", data, re.IGNORECASE)
    return int(match.group(1)) if match else 0


@pytest.mark.parametrize("path", ["/v1/no-such-path", "/v1/sessions", "/v1/users/me"])
def test_a_websocket_upgrade_of_an_api_path_is_a_4xx(stack: Stack, user: Caller, path: str) -> None:
    status, body = _upgrade(stack, path, user.token)
    assert 400 <= status < 500, (status, body)
    message = json.loads(body)["message"]
    assert message and not INTERNALS.search(message)


@pytest.mark.parametrize("header", [("x-a$b", "1"), ("x-trace-bin", "!!not base64"), ("grpc-timeout", "soon"),
                                    ("grpc-encoding", "zip")])
def test_headers_grpc_would_refuse_are_dropped_not_500(http: httpx.Client, header: tuple[str, str]) -> None:
    """Found by the fuzzer: gRPC fails a whole call on these; HTTP allows them."""
    answer = http.get("/v1/users/me", headers=dict([header]))
    assert answer.status_code == 200, answer.text


def test_a_body_too_large_for_an_openai_path_is_413_invalid_request_error(http: httpx.Client) -> None:
    huge = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 3 * 2**20}]))
    answer = http.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert_clear_4xx(answer, 413, "larger")
