"""The WebSocket bridge's own logic, without the rest of the stack: client messages to Converse
requests, upgrades from a foreign Origin refused (4403), and a client that stops reading is closed
(4429) with its call cancelled, having held a bounded amount of data. The whole protocol runs end to
end in tests/integration/test_websocket_api.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import grpc
import pytest
from parley.session.v1 import session_pb2
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from services.core.config import CommonSettings
from services.session.settings import SessionSettings
from services.session.websocket import WebSocketBridge, client_request, event_json, origin_allowed


def test_client_messages_become_converse_requests() -> None:
    chat = client_request('{"type": "chat", "content": "Hi", "sampling": {"temperature": 0, "max_tokens": 5}}')
    assert chat.chat.content == "Hi" and chat.chat.sampling.max_tokens == 5 and chat.chat.sampling.temperature == 0
    assert client_request('{"type": "stop"}').HasField("stop")
    assert client_request('{"type": "ping"}') == "ping"
    for bad, words in [("not json", "JSON object"), ("[1]", "JSON object"), (b"\x00", "binary"),
                       ('{"type": "dance"}', "chat, stop or ping"), ('{"type": "auth", "token": "x"}', "already"),
                       ('{"type": "chat", "content": 5}', "chat:"), ('{"type": "chat", "colour": "red"}', "chat:")]:
        with pytest.raises(ValueError, match=words):
            client_request(bad)


def test_events_are_typed_json_with_every_field() -> None:
    text = event_json(session_pb2.ConverseResponse(queued=session_pb2.ChatQueued(position=3)))
    assert text == '{"type": "queued", "position": 3, "estimated_wait_ms": 0}'


class EndlessAnswer:
    """A Converse call whose answer never ends: a 64 KiB delta per read."""

    def __init__(self) -> None:
        self.reads = 0
        self.cancelled_at: float | None = None

    async def write(self, request: session_pb2.ConverseRequest) -> None:
        pass

    async def read(self) -> session_pb2.ConverseResponse:
        self.reads += 1
        await asyncio.sleep(0)
        if self.reads == 1:
            return session_pb2.ConverseResponse(ready=session_pb2.ConverseReady(session_id="s1"))
        return session_pb2.ConverseResponse(delta=session_pb2.ChatDelta(text="x" * 65536))

    def cancel(self) -> bool:
        self.cancelled_at = self.cancelled_at or time.monotonic()
        return True


async def test_a_client_that_stops_reading_is_closed_and_its_call_cancelled() -> None:
    settings = SessionSettings(websocket_send_buffer_bytes=1024, websocket_send_timeout_seconds=0.5)
    bridge = WebSocketBridge(CommonSettings(session_websocket_port=0), settings)
    call = EndlessAnswer()

    class Stub:
        def Converse(self, metadata: tuple) -> EndlessAnswer:  # noqa: N802 - the stub's method name
            assert ("authorization", "Bearer t0ken") in metadata
            return call

    bridge._stub = Stub()  # type: ignore[assignment]
    await bridge.start()
    try:
        port = bridge._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /v1/sessions/s1:connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Authorization: Bearer t0ken\r\n\r\n").encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        started = time.monotonic()  # from here on the client reads nothing
        while call.cancelled_at is None and time.monotonic() - started < 30:
            await asyncio.sleep(0.05)
        assert call.cancelled_at is not None, f"still sending after {call.reads} reads"
        # The send timeout (0.5 s) ends it, not the keepalive pings (20 s).
        assert call.cancelled_at - started < 5
        # What was read before the close is what the socket buffers held: bounded, not the endless answer.
        assert call.reads < 1000
        writer.close()
    finally:
        await bridge.close()


def test_origin_is_the_requests_own_host_or_a_listed_one() -> None:
    allowed = ("https://chat.example.com",)
    for origin, host in [(None, "x"), ("http://127.0.0.1:8080", "127.0.0.1:8080"),
                         ("https://Parley.Example", "parley.example"), ("https://parley.example", "parley.example:443"),
                         ("http://parley.example", "parley.example:80"), ("https://chat.example.com", "parley.example"),
                         ("https://chat.example.com/", "x")]:
        assert origin_allowed(origin, host, allowed), (origin, host)
    for origin, host in [("https://evil.example", "parley.example"), ("http://127.0.0.1:9999", "127.0.0.1:8080"),
                         ("https://parley.example", "parley.example:80"), ("null", "parley.example"),
                         ("http://127.0.0.1:8080", None), ("file://", "x"),
                         ("https://parley.example:x", "parley.example"),
                         ("https://chat.example.com.evil.example", "x")]:
        assert not origin_allowed(origin, host, allowed), (origin, host)


class ReadyCall:
    """A Converse call that answers ready, then nothing more."""

    async def write(self, request: session_pb2.ConverseRequest) -> None:
        pass

    async def read(self) -> session_pb2.ConverseResponse:
        if not hasattr(self, "answered"):
            self.answered = True
            return session_pb2.ConverseResponse(ready=session_pb2.ConverseReady(session_id="s1"))
        await asyncio.sleep(3600)

    def cancel(self) -> bool:
        return True


async def test_an_upgrade_from_a_foreign_origin_closes_with_4403_before_any_call() -> None:
    bridge = WebSocketBridge(CommonSettings(session_websocket_port=0),
                             SessionSettings(cors_origins=("https://chat.example.com",)))
    calls: list[tuple] = []

    class Stub:
        def Converse(self, metadata: tuple) -> ReadyCall:  # noqa: N802 - the stub's method name
            calls.append(metadata)
            return ReadyCall()

    bridge._stub = Stub()  # type: ignore[assignment]
    await bridge.start()
    try:
        port = bridge._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"ws://127.0.0.1:{port}/v1/sessions/s1:connect"
        auth = {"authorization": "Bearer t0ken"}
        for origin in ("https://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
            async with connect(url, origin=origin, additional_headers=auth) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403, origin
            assert "may not open" in closed.value.rcvd.reason
        assert calls == []  # refused before the credential was read or a Converse call made
        # No Origin (a non-browser client), the page's own origin, a listed origin: ready.
        for origin in (None, f"http://127.0.0.1:{port}", "https://chat.example.com"):
            async with connect(url, origin=origin, additional_headers=auth) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "ready", origin
        assert len(calls) == 3
    finally:
        await bridge.close()
