"""GET /v1/openapi.json through Envoy, and real answers of every kind checked against it: a
conversation, streamed turns, the native and OpenAI-compatible generation paths (JSON and
server-sent events), accounts and admin pages. (The fuzzer, test_api_fuzz.py, covers the rest.)"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis

from services.stack import ROOT, Stack
from tests.integration.conftest import Caller

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
OPENAPI = ROOT / "build" / "openapi.json"


@pytest.fixture(scope="module")
def schema() -> Any:
    return schemathesis.openapi.from_path(OPENAPI)


def check(schema: Any, template: str, method: str, answer: httpx.Response, status: int = 200) -> None:
    assert answer.status_code == status, answer.text[:500]
    schema[template][method].validate_response(answer)


def test_the_gateway_serves_the_generated_document_to_anyone(stack: Stack) -> None:
    answer = httpx.get(f"{stack.url}/v1/openapi.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == json.loads(OPENAPI.read_text())
    assert answer.json()["openapi"] == "3.1.0"
    assert httpx.post(f"{stack.url}/v1/openapi.json").status_code == 404


def test_a_conversation_answers_as_documented(schema: Any, stack: Stack, user: Caller) -> None:
    with httpx.Client(base_url=stack.url, headers=user.headers, timeout=60) as http:
        created = http.post("/v1/sessions", json={"session": {"title": "documented", "sampling": {"temperature": 0}}})
        check(schema, "/v1/sessions", "POST", created)
        sid = created.json()["id"]
        turn = http.post(f"/v1/sessions/{sid}:chat", json={"content": "Hi", "sampling": {"max_tokens": 3}})
        check(schema, "/v1/sessions/{session_id}:chat", "POST", turn)
        events = [json.loads(line[5:]) for line in turn.text.splitlines() if line.startswith("data:")]
        assert "start" in events[0] and "done" in events[-1]
        check(schema, "/v1/sessions/{session_id}/messages", "GET", http.get(f"/v1/sessions/{sid}/messages"))
        check(schema, "/v1/sessions/{id}", "GET", http.get(f"/v1/sessions/{sid}"))
        check(schema, "/v1/sessions/{id}", "PATCH",
              http.patch(f"/v1/sessions/{sid}", params={"update_mask": "title"}, json={"title": "renamed"}))
        check(schema, "/v1/sessions", "GET", http.get("/v1/sessions", params={"page_size": 1}))
        check(schema, "/v1/sessions/{id}", "DELETE", http.delete(f"/v1/sessions/{sid}"))
        check(schema, "/v1/sessions/{id}", "GET", http.get(f"/v1/sessions/{sid}"), 404)


def test_generation_answers_as_documented(schema: Any, stack: Stack, user: Caller) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with httpx.Client(base_url=stack.url, headers=user.headers, timeout=60) as http:
        check(schema, "/v1/models", "GET", http.get("/v1/models"))
        check(schema, "/v1/models/{id}", "GET", http.get(f"/v1/models/{MODEL}"))
        check(schema, "/v1/models/{model}:countTokens", "POST",
              http.post(f"/v1/models/{MODEL}:countTokens", json={"messages": messages}))
        check(schema, "/v1/models/{model}:generate", "POST",
              http.post(f"/v1/models/{MODEL}:generate", json={"messages": messages, "sampling": {"max_tokens": 3}}))
        check(schema, "/v1/models/{model}:embed", "POST",
              http.post(f"/v1/models/{EMBEDDING_MODEL}:embed", json={"inputs": [{"text": "hi"}]}))
        for stream in (False, True):
            check(schema, "/v1/chat/completions", "POST", http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": messages, "max_tokens": 3, "stream": stream, "logprobs": True,
                "top_logprobs": 2, "stream_options": {"include_usage": True}}))
            check(schema, "/v1/completions", "POST", http.post("/v1/completions", json={
                "model": MODEL, "prompt": "Once", "max_tokens": 3, "stream": stream}))
            answer = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 3,
                                                      "stream": stream})
            check(schema, "/v1/responses", "POST", answer)
        rid = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 3}).json()["id"]
        check(schema, "/v1/responses/{id}", "GET", http.get(f"/v1/responses/{rid}"))
        check(schema, "/v1/responses/{id}/input_items", "GET", http.get(f"/v1/responses/{rid}/input_items"))
        check(schema, "/v1/responses/{id}", "DELETE", http.delete(f"/v1/responses/{rid}"))
        for encoding in ("float", "base64"):
            check(schema, "/v1/embeddings", "POST", http.post("/v1/embeddings", json={
                "model": EMBEDDING_MODEL, "input": ["a", "b"], "encoding_format": encoding}))
        check(schema, "/v1/chat/completions", "POST",
              http.post("/v1/chat/completions", json={"model": "nope", "messages": messages}), 404)
        for stream in (False, True):
            check(schema, "/v1/messages", "POST", http.post("/v1/messages", json={
                "model": MODEL, "messages": messages, "max_tokens": 3, "stream": stream}))
        check(schema, "/v1/messages", "POST", http.post("/v1/messages", json={"model": MODEL, "messages": messages}), 400)
        check(schema, "/v1/messages/count_tokens", "POST",
              http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": messages}))


def test_accounts_and_admin_pages_answer_as_documented(schema: Any, stack: Stack, user: Caller,
                                                       admin: Caller) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        login = http.post("/v1/auth/login", json={"username": user.username, "password": "Plenty-long-passphrase-42"})
        check(schema, "/v1/auth/login", "POST", login)
        refresh = login.json()["tokens"]["refresh_token"]
        refreshed = http.post("/v1/auth/refresh", json={"refresh_token": refresh})
        check(schema, "/v1/auth/refresh", "POST", refreshed)
        check(schema, "/v1/auth/login", "POST", http.post("/v1/auth/login", json={"username": user.username,
                                                                                  "password": "wrong"}), 401)
        check(schema, "/v1/auth/jwks", "GET", http.get("/v1/auth/jwks"))
        check(schema, "/v1/users/me", "GET", http.get("/v1/users/me", headers=user.headers))
        key = http.post("/v1/api-keys", json={"name": "documented", "ttl_seconds": 3600}, headers=user.headers)
        check(schema, "/v1/api-keys", "POST", key)
        check(schema, "/v1/api-keys", "GET", http.get("/v1/api-keys", headers=user.headers))
        check(schema, "/v1/api-keys/{id}", "DELETE",
              http.delete(f"/v1/api-keys/{key.json()['api_key']['id']}", headers=user.headers))
        me = http.get("/v1/users/me", headers=user.headers).json()["id"]
        check(schema, "/v1/rate-limits/{user_id}", "GET", http.get(f"/v1/rate-limits/{me}", headers=user.headers))
        check(schema, "/v1/usage", "GET", http.get("/v1/usage", params={"group_by": "model"}, headers=user.headers))
        check(schema, "/v1/usage", "GET", http.get("/v1/usage", params={"user_id": "*"}, headers=user.headers), 404)
        check(schema, "/v1/auth/logout", "POST",
              http.post("/v1/auth/logout", json={"refresh_token": refreshed.json()["tokens"]["refresh_token"]},
                        headers=user.headers))
        for path in ("/v1/admin/hardware", "/v1/admin/metrics", "/v1/cache/stats"):
            check(schema, path, "GET", http.get(path, headers=admin.headers))
        check(schema, "/v1/admin/hardware", "GET", http.get("/v1/admin/hardware", headers=user.headers), 403)
        check(schema, "/healthz", "GET", http.get("/healthz"))
