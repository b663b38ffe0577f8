"""The chat app's WebSocket in a real browser: turns go over GET /v1/sessions/{id}:connect (auth in
the first message), the answer shows its place in line while the server is busy, and the app falls
back to SSE where WebSocket is unavailable."""

from __future__ import annotations

import threading

import httpx

from tests.e2e.conftest import PASSWORD, register
from tests.e2e.test_chat import send, wait_answer
from tests.integration.conftest import sign_in

MODEL = "smollm2-135m-instruct"


def short_chat(page, web_url: str) -> str:
    """A conversation with short answers (made through the API with the page's own token), opened."""
    token = page.evaluate("JSON.parse(localStorage.getItem('parley.auth')).access_token")
    made = httpx.post(f"{web_url}/v1/sessions", json={"sampling": {"max_tokens": 16}},
                      headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert made.status_code == 200, made.text
    session_id = made.json()["id"]
    page.goto(f"/#/s/{session_id}")
    page.get_by_label("Message", exact=True).wait_for()
    return session_id


def test_turns_use_the_websocket_and_show_the_place_in_line(signed_in, web_url: str) -> None:
    username = register(web_url)
    page = signed_in(username=username)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    short_chat(page, web_url)
    send(page, "Say hello.")
    first = wait_answer(page)
    assert first.get_attribute("data-transport") == "websocket"
    assert len(sockets) == 1 and sockets[0].endswith(":connect") and "token" not in sockets[0]

    # The same user's four streams from a script fill both slots and the queue ahead: the next answer
    # says where it waits, then streams on the same socket. (Another user's streams would not make it
    # wait: fair share starts a user with nothing running first, pausing one of theirs.)
    other = sign_in(web_url, username, PASSWORD)
    started = [threading.Event() for _ in range(4)]

    def stream(ready: threading.Event) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": 32, "temperature": 0.9,
                "messages": [{"role": "user", "content": "Tell me a story about a dragon."}]}
        with httpx.stream("POST", f"{web_url}/v1/chat/completions", json=body, headers=other.headers, timeout=120) as r:
            ready.set()
            for _ in r.iter_lines():
                pass

    threads = [threading.Thread(target=stream, args=(ready,)) for ready in started]
    for thread in threads:
        thread.start()
    for ready in started:
        assert ready.wait(60)
    send(page, "And goodbye.")
    waiting = page.locator(".msg.assistant[data-queue-position]").last
    waiting.wait_for(timeout=30_000)
    assert "Waiting in line:" in waiting.locator(".msg-note").inner_text()
    assert int(waiting.get_attribute("data-queue-position")) >= 1
    answer = wait_answer(page, timeout=120_000)
    assert answer.get_attribute("data-transport") == "websocket"
    assert "tokens" in answer.locator(".msg-note").inner_text()
    assert len(sockets) == 1  # one socket for the whole conversation
    for thread in threads:
        thread.join(120)


def test_falls_back_to_sse_without_websocket(signed_in, web_url: str) -> None:
    page = signed_in(username=register(web_url))
    page.add_init_script("delete window.WebSocket")
    page.reload()
    short_chat(page, web_url)
    send(page, "Say hello.")
    answer = wait_answer(page)
    assert answer.get_attribute("data-transport") == "sse"
    assert answer.locator(".msg-body").inner_text().strip()
