"""Talking to the session API through Envoy the way the PWA does: JSON requests, SSE chat events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from tests.integration.conftest import Caller


def create_session(http: httpx.Client, caller: Caller, **fields: Any) -> dict[str, Any]:
    answer = http.post("/v1/sessions", json=fields, headers=caller.headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def iter_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """SSE events as they arrive (Envoy's transcoder sends one `data: <json>` line per message)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


def chat(http: httpx.Client, caller: Caller, session_id: str, content: str, **extra: Any) -> list[dict[str, Any]]:
    """One turn; returns its SSE events (start, delta…, done or error). Fails on a non-200 answer.
    `queued` events (the server was busy; test_websocket_api.py checks them) are left out."""
    with http.stream("POST", f"/v1/sessions/{session_id}:chat", json={"content": content, **extra},
                     headers=caller.headers) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"{response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        return [event for event in iter_events(response) if "queued" not in event]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"]["text"] for e in events if "delta" in e)


def messages(http: httpx.Client, caller: Caller, session_id: str) -> list[dict[str, Any]]:
    answer = http.get(f"/v1/sessions/{session_id}/messages", params={"page_size": 1000}, headers=caller.headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["messages"]
