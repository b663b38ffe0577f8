"""Simulated users: each registers, then loops over a weighted mix of what Parley's clients do until
the deadline, and writes what it saw into one Journal (every request's times and outcome, every turn
the server acknowledged with the text the client received). The invariants compare the Journal with
the stores; the client's memory is only ever the "what was promised" side.

Every user message carries a nonce (`[<user>#<n>]`), so the stores can be searched for it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
PASSWORD = "Soak-passphrase-4242"
SHORT_TOKENS = 16  # a normal answer: the model is tiny and the machine may have 2 cores
LONG_TOKENS = 96  # an answer the client stops or abandons after its first deltas
TIMEOUT = 60.0  # a request silent for this long counts as a server failure (a hang)
REFRESH_AFTER = 600.0  # seconds: a client renews its access token (15 minutes' lifetime) before it expires
# Requests that run the models; the rest (sign-ins, keys, conversations' records) must stay quick
# however busy the engine is.
MODEL_WORK = frozenset({"chat_completion", "chat_completion_stream", "tool_call", "embeddings", "response",
                        "session_sse", "session_ws"})
SERVER_CODES = {"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS"}
QUESTIONS = ("What is the capital of France?", "Name a colour.", "Why is the sky blue?", "Tell me a short joke.",
             "How do bees make honey?", "What is two plus two?", "Name a fruit.", "Say hello.")
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                                 "parameters": {"type": "object", "required": ["city"],
                                                                "properties": {"city": {"type": "string"}}}}}


@dataclass
class Request:
    """One request as the client saw it. Times are seconds since the run started. `outcome`: ok,
    busy (429 / RESOURCE_EXHAUSTED), conflict (409 / ABORTED), refused (another 4xx), server (5xx,
    a cut connection, an error event with a server code, a hang) or cancelled (the client left)."""

    kind: str
    start: float
    end: float = 0.0
    first: float = 0.0  # first token of a stream; the whole answer otherwise
    status: int = 0
    outcome: str = "ok"
    detail: str = ""

    @property
    def latency(self) -> float:
        return (self.first or self.end) - self.start


@dataclass
class Turn:
    """A turn the server acknowledged (it named the stored messages) and what the client got of it.
    `ending`: done, stopped (the client asked), abandoned (the client left), failed (error or cut)."""

    kind: str
    nonce: str
    assistant_id: str
    text: str = ""
    ending: str = "failed"


@dataclass
class Journal:
    clock: Callable[[], float]
    requests: list[Request] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    nonces: list[tuple[str, bool]] = field(default_factory=list)  # every nonce sent; acknowledged?
    refreshes: list[tuple[Request, Request, bool]] = field(default_factory=list)  # both, same successor?
    revoked: list[Request] = field(default_factory=list)  # a revoked key used again
    sessions: dict[str, list[str]] = field(default_factory=dict)  # user -> session ids
    harness_errors: list[str] = field(default_factory=list)

    def begin(self, kind: str) -> Request:
        request = Request(kind, self.clock())
        self.requests.append(request)
        return request


def classify(request: Request, status: int, detail: str = "") -> None:
    request.status = status
    request.end = request.end or 0.0
    if status == 200:
        request.outcome = "ok"
    elif status == 429:
        request.outcome = "busy"
    elif status == 409:
        request.outcome = "conflict"
    elif 400 <= status < 500:
        request.outcome = "refused"
    else:
        request.outcome = "server"
    request.detail = detail[:200]


def stream_error(request: Request, code: str, message: str) -> None:
    """An error that arrived inside a stream (an SSE `error` event, a WebSocket `error` message)."""
    request.outcome = ("server" if code in SERVER_CODES else "busy" if code == "RESOURCE_EXHAUSTED"
                       else "conflict" if code == "ABORTED" else "refused")
    request.detail = f"{code}: {message}"[:200]


async def sse_data(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[len("data: "):])


class User:
    def __init__(self, number: int, url: str, journal: Journal, rng: random.Random, deadline: float,
                 think: tuple[float, float], key_cache_seconds: float) -> None:
        self.name = f"soak{number:03d}-{uuid.uuid4().hex[:6]}"
        self.url, self.journal, self.rng, self.deadline = url, journal, rng, deadline
        self.ws_url = url.replace("http://", "ws://")
        self.think, self.key_cache_seconds = think, key_cache_seconds
        self.http = httpx.AsyncClient(base_url=url, timeout=TIMEOUT)
        self.access = self.refresh_token = self.api_key = ""
        self.signed_in_at = 0.0
        self.sessions: list[str] = journal.sessions.setdefault(self.name, [])
        self.previous_response = ""
        self.sent = 0
        self.actions: list[tuple[Callable[[], Awaitable[None]], int]] = [
            (self.sse_turn, 20), (self.ws_turn, 15), (self.completion, 12), (self.completion_stream, 12),
            (self.tool_call, 6), (self.embeddings, 8), (self.response, 10), (self.sign_in, 3),
            (self.double_refresh, 3), (self.api_key_round, 2)]

    # Plumbing

    def nonce(self) -> str:
        self.sent += 1
        return f"[{self.name}#{self.sent}]"

    def content(self, nonce: str) -> str:
        return f"{nonce} {self.rng.choice(QUESTIONS)}"

    def bearer(self, secret: str = "") -> dict[str, str]:
        secret = secret or self.access
        return {"authorization": f"Bearer {secret}"} if secret else {}

    async def call(self, kind: str, method: str, path: str, secret: str = "", *, request: Request | None = None,
                   **options: Any) -> httpx.Response | None:
        """One plain request, recorded (in `request` when given); None when the connection failed."""
        request = request or self.journal.begin(kind)
        try:
            response = await self.http.request(method, path, headers=self.bearer(secret), **options)
        except httpx.HTTPError as exc:
            request.end = self.journal.clock()
            request.outcome, request.detail = "server", f"{type(exc).__name__}: {exc}"[:200]
            return None
        request.end = self.journal.clock()
        classify(request, response.status_code, "" if response.status_code == 200 else response.text)
        return response

    def take_tokens(self, body: dict[str, Any]) -> None:
        self.access, self.refresh_token = body["tokens"]["access_token"], body["tokens"]["refresh_token"]
        self.signed_in_at = self.journal.clock()

    async def stay_signed_in(self) -> None:
        """As the web app does: a fresh access token from the refresh token before the old one expires."""
        if self.journal.clock() - self.signed_in_at < REFRESH_AFTER:
            return
        answer = await self.call("refresh", "POST", "/v1/auth/refresh", json={"refresh_token": self.refresh_token})
        if answer is not None and answer.status_code == 200:
            self.take_tokens(answer.json())
        else:
            await self.sign_in()

    async def run(self, start_delay: float) -> None:
        await asyncio.sleep(start_delay)
        try:
            if not await self.register():
                return
            while self.journal.clock() < self.deadline:
                action = self.rng.choices([a for a, _ in self.actions], [w for _, w in self.actions])[0]
                try:
                    await self.stay_signed_in()
                    await asyncio.wait_for(action(), timeout=3 * TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - a harness bug must not end the run quietly
                    self.journal.harness_errors.append(f"{self.name} {action.__name__}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(self.rng.uniform(*self.think))
        finally:
            await self.http.aclose()

    async def register(self) -> bool:
        """Registers (or, when an earlier try got through unseen, signs in) and takes an API key;
        retries while a fault keeps auth away."""
        path = "/v1/auth/register"
        while self.journal.clock() < self.deadline:
            answer = await self.call("register", "POST", path, json={"username": self.name, "password": PASSWORD})
            if answer is not None and answer.status_code == 200:
                self.take_tokens(answer.json())
                key = await self.call("api_key_create", "POST", "/v1/api-keys", json={"name": "soak"})
                if key is not None and key.status_code == 200:
                    self.api_key = key.json()["secret"]
                    return True
            elif answer is not None and answer.status_code == 409:
                path = "/v1/auth/login"
            await asyncio.sleep(1)
        return False

    async def new_session(self) -> str:
        answer = await self.call("session_create", "POST", "/v1/sessions", json={"model": MODEL})
        if answer is None or answer.status_code != 200:
            return ""
        self.sessions.append(answer.json()["id"])
        return self.sessions[-1]

    async def session(self) -> str:
        if not self.sessions or self.rng.random() < 0.25:
            return await self.new_session()
        return self.sessions[-1]

    def ending(self) -> tuple[str, int]:
        """How the client ends this turn: reads it all, stops it or abandons it after a few deltas."""
        roll = self.rng.random()
        if roll < 0.15:
            return "stopped", LONG_TOKENS
        if roll < 0.3:
            return "abandoned", LONG_TOKENS
        return "done", SHORT_TOKENS

    # Actions

    async def sse_turn(self) -> None:
        """POST /v1/sessions/{id}:chat; a stopped or abandoned turn is a client disconnect."""
        sid = await self.session()
        if not sid:
            return
        nonce, (plan, tokens) = self.nonce(), self.ending()
        request, turn = self.journal.begin("session_sse"), None
        body = {"content": self.content(nonce), "sampling": {"max_tokens": tokens, "temperature": 0.8}}
        try:
            async with self.http.stream("POST", f"/v1/sessions/{sid}:chat", json=body,
                                        headers=self.bearer()) as response:
                if response.status_code != 200:
                    await response.aread()
                    classify(request, response.status_code, response.text)
                else:
                    async for event in sse_data(response):
                        if "start" in event:
                            turn = Turn("session_sse", nonce, event["start"]["assistant_message_id"])
                        elif "delta" in event and turn is not None:
                            request.first = request.first or self.journal.clock()
                            turn.text += event["delta"].get("text", "")
                            if plan != "done" and len(turn.text) > 8:
                                request.outcome, turn.ending = "cancelled", plan
                                break
                        elif "done" in event and turn is not None:
                            turn.ending = "done"
                        elif "error" in event:
                            stream_error(request, event["error"].get("code", ""), event["error"].get("message", ""))
                    if turn is None and request.outcome == "ok":
                        request.outcome, request.detail = "server", "stream ended before start"
                    elif turn is not None and turn.ending == "failed" and request.outcome == "ok":
                        request.outcome, request.detail = "server", "stream ended without done or error"
        except httpx.HTTPError as exc:
            request.outcome, request.detail = "server", f"{type(exc).__name__}: {exc}"[:200]
        request.end = self.journal.clock()
        self.acknowledge(nonce, turn)

    def acknowledge(self, nonce: str, turn: Turn | None) -> None:
        self.journal.nonces.append((nonce, turn is not None))
        if turn is not None:
            self.journal.turns.append(turn)

    async def ws_turn(self) -> None:
        """One or two turns on a socket; a stopped turn sends {"type": "stop"}, an abandoned one closes
        the socket mid-answer."""
        sid = await self.session()
        if not sid:
            return
        request = self.journal.begin("session_ws")
        try:
            async with connect(f"{self.ws_url}/v1/sessions/{sid}:connect", additional_headers=self.bearer(),
                               open_timeout=TIMEOUT, close_timeout=2) as ws:
                ready = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                if ready.get("type") != "ready":
                    request.outcome, request.detail = "server", f"first message {ready}"
                for number in range(self.rng.choice((1, 1, 2))):
                    if number:
                        request = self.journal.begin("session_ws")
                    if not await self.ws_one_turn(ws, request):
                        break
        except (ConnectionClosed, InvalidStatus, WebSocketException, OSError, asyncio.TimeoutError) as exc:
            if request.outcome == "ok":
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                status = getattr(getattr(exc, "response", None), "status_code", 0)
                request.outcome = "refused" if code == 4401 or status in (401, 404) else "server"
                request.status = status
                request.detail = f"{type(exc).__name__}: {exc}"[:200]
        request.end = request.end or self.journal.clock()

    async def ws_one_turn(self, ws: ClientConnection, request: Request) -> bool:
        """Returns whether the socket may carry another turn."""
        nonce, (plan, tokens) = self.nonce(), self.ending()
        turn = None
        try:
            await ws.send(json.dumps({"type": "chat", "content": self.content(nonce),
                                      "sampling": {"max_tokens": tokens, "temperature": 0.8}}))
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                kind = event.get("type")
                if kind == "start":
                    turn = Turn("session_ws", nonce, event["assistant_message_id"])
                elif kind == "delta" and turn is not None:
                    request.first = request.first or self.journal.clock()
                    turn.text += event.get("text", "")
                    if plan == "abandoned" and len(turn.text) > 8:
                        turn.ending, request.outcome = "abandoned", "cancelled"
                        await ws.close()
                        return False
                    if plan == "stopped" and len(turn.text) > 8 and request.outcome == "ok":
                        request.outcome = "cancelled"
                        await ws.send(json.dumps({"type": "stop"}))
                elif kind == "done" and turn is not None:
                    turn.ending = "stopped" if request.outcome == "cancelled" else "done"
                    return True
                elif kind == "error":
                    stream_error(request, event.get("code", ""), event.get("message", ""))
                    return True
        finally:
            request.end = self.journal.clock()
            self.acknowledge(nonce, turn)

    async def completion(self) -> None:
        body = {"model": MODEL, "max_tokens": SHORT_TOKENS, "temperature": self.rng.choice((0, 0.8)),
                "messages": [{"role": "user", "content": self.rng.choice(QUESTIONS)}]}
        await self.call("chat_completion", "POST", "/v1/chat/completions", self.api_key, json=body)

    async def completion_stream(self) -> None:
        body = {"model": MODEL, "max_tokens": SHORT_TOKENS, "stream": True, "temperature": 0.8,
                "messages": [{"role": "user", "content": self.rng.choice(QUESTIONS)}]}
        request = self.journal.begin("chat_completion_stream")
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=body,
                                        headers=self.bearer(self.api_key)) as response:
                if response.status_code != 200:
                    await response.aread()
                    classify(request, response.status_code, response.text)
                else:
                    finished = False
                    async for chunk in sse_data(response):
                        if "error" in chunk:
                            request.outcome, request.detail = "server", str(chunk["error"])[:200]
                        elif chunk.get("choices"):
                            request.first = request.first or self.journal.clock()
                            finished = finished or chunk["choices"][0].get("finish_reason") is not None
                    if not finished and request.outcome == "ok":
                        request.outcome, request.detail = "server", "stream ended without a finish_reason"
        except httpx.HTTPError as exc:
            request.outcome, request.detail = "server", f"{type(exc).__name__}: {exc}"[:200]
        request.end = self.journal.clock()

    async def tool_call(self) -> None:
        body = {"model": MODEL, "max_tokens": 48, "temperature": 0, "tools": [WEATHER_TOOL], "tool_choice": "required",
                "messages": [{"role": "user", "content": f"What is the weather in {self.rng.choice(('Oslo', 'Paris'))}?"}]}
        await self.call("tool_call", "POST", "/v1/chat/completions", self.api_key, json=body)

    async def embeddings(self) -> None:
        body = {"model": EMBEDDING_MODEL, "input": [self.rng.choice(QUESTIONS) for _ in range(self.rng.randint(1, 8))]}
        await self.call("embeddings", "POST", "/v1/embeddings", self.api_key, json=body)

    async def response(self) -> None:
        """POST /v1/responses continuing this user's chain (previous_response_id) most of the time."""
        nonce = self.nonce()
        body: dict[str, Any] = {"model": MODEL, "input": self.content(nonce), "max_output_tokens": SHORT_TOKENS}
        if self.previous_response and self.rng.random() < 0.8:
            body["previous_response_id"] = self.previous_response
        answer = await self.call("response", "POST", "/v1/responses", self.api_key, json=body)
        turn = None
        if answer is not None and answer.status_code == 200:
            reply = answer.json()
            self.previous_response = reply["id"]
            text = "".join(part.get("text", "") for item in reply.get("output", []) if item.get("type") == "message"
                           for part in item.get("content", []))
            ending = "done" if reply.get("status") in ("completed", "incomplete") else "failed"
            turn = Turn("response", nonce, reply["id"].removeprefix("resp_"), text, ending)
        self.acknowledge(nonce, turn)

    async def sign_in(self) -> None:
        answer = await self.call("sign_in", "POST", "/v1/auth/login", json={"username": self.name, "password": PASSWORD})
        if answer is not None and answer.status_code == 200:
            self.take_tokens(answer.json())

    async def double_refresh(self) -> None:
        """Two tabs refresh with one refresh token at once: both must get the same successor."""
        async def refresh() -> tuple[Request, httpx.Response | None]:
            request = self.journal.begin("refresh")
            try:
                response = await self.http.post("/v1/auth/refresh", json={"refresh_token": self.refresh_token})
            except httpx.HTTPError as exc:
                request.end, request.outcome, request.detail = self.journal.clock(), "server", str(exc)[:200]
                return request, None
            request.end = self.journal.clock()
            classify(request, response.status_code, "" if response.status_code == 200 else response.text)
            return request, response

        (first, a), (second, b) = await asyncio.gather(refresh(), refresh())
        good = [r.json() for r in (a, b) if r is not None and r.status_code == 200]
        same = len(good) == 2 and good[0]["tokens"]["refresh_token"] == good[1]["tokens"]["refresh_token"]
        self.journal.refreshes.append((first, second, same))
        if good:
            self.take_tokens(good[0])
        else:  # the token may be spent or revoked now: start a new sign-in
            await self.sign_in()

    async def api_key_round(self) -> None:
        """Creates a key, uses it, revokes it; once the services' key cache has expired it must be refused."""
        created = await self.call("api_key_create", "POST", "/v1/api-keys", json={"name": "soak-temporary"})
        if created is None or created.status_code != 200:
            return
        secret, key_id = created.json()["secret"], created.json()["api_key"]["id"]
        await self.call("api_key_use", "GET", "/v1/models", secret)
        revoked = await self.call("api_key_revoke", "DELETE", f"/v1/api-keys/{key_id}")
        if revoked is None or revoked.status_code != 200:
            return
        await asyncio.sleep(self.key_cache_seconds + 1)
        check = self.journal.begin("api_key_use_revoked")
        used = await self.call(check.kind, "GET", "/v1/models", secret, request=check)
        if used is not None and used.status_code == 401:
            check.outcome = "ok"  # refused, as it should be
        self.journal.revoked.append(check)

    async def probe_sessions(self) -> list[tuple[str, int]]:
        """After the run: a one-token turn on each of this user's sessions (listed by the server) ->
        (session id, status). 409 means the conversation is still locked."""
        found: list[tuple[str, int]] = []
        async with httpx.AsyncClient(base_url=self.url, timeout=TIMEOUT) as http:
            login = await http.post("/v1/auth/login", json={"username": self.name, "password": PASSWORD})
            if login.status_code != 200:
                return [("(sign-in)", login.status_code)]
            headers = {"authorization": f"Bearer {login.json()['tokens']['access_token']}"}
            listed = await http.get("/v1/sessions", params={"page_size": 200}, headers=headers)
            for session in listed.json().get("sessions", []):
                body = {"content": "[probe] Hi", "sampling": {"max_tokens": 1}}
                async with http.stream("POST", f"/v1/sessions/{session['id']}:chat", json=body, headers=headers) as r:
                    await r.aread()
                    found.append((session["id"], r.status_code))
        return found


def now_clock() -> Callable[[], float]:
    origin = time.monotonic()
    return lambda: time.monotonic() - origin
