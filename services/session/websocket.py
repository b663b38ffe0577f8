"""The WebSocket bridge: GET /v1/sessions/{id}:connect as JSON messages over the Converse RPC.

Envoy upgrades WebSocket connections but does not transcode them to gRPC, so the session process
runs this small HTTP/1.1 server beside its gRPC server (PARLEY_SESSION_WEBSOCKET_PORT) and Envoy
routes the path here. Each socket is one Converse call to this process's own gRPC server, through
the same interceptors as every call (identity, error mapping, telemetry): the bridge only turns
JSON into requests and events into JSON. The turn rules are Converse's (services/session/conversation.py).

Authentication: the `Authorization: Bearer` header of the upgrade request, or — for browsers, which
cannot set it — a first message {"type": "auth", "token": ...} within PARLEY_WEBSOCKET_AUTH_SECONDS.
A token is never read from the URL.

Origin: browsers send the page's origin with the upgrade, and a WebSocket is not bound by CORS, so a
page from anywhere could open one (and a browser's stored credential would follow). An upgrade whose
Origin is neither the origin the request came to (its Host, which Envoy passes on unchanged) nor one
of PARLEY_CORS_ORIGINS is closed with 4403 before anything is read — browsers show a close code and
reason to the page, where a refused handshake is only 1006. Clients that send no Origin (non-browser
clients, e.g. the `websockets` library) are not affected.

Client messages: {"type": "chat", "content", "model"?, "sampling"?, "structured"?, "tool_results"?}
(ChatRequest's JSON), {"type": "stop"}, {"type": "ping"}. Server messages: ready, queued, start,
delta, done, error (the fields of ConverseResponse's events, snake_case) and pong.

Close codes (CLOSE_CODES): 4401 no or bad credentials, 4403 a foreign Origin or not allowed, 4404 no such session of
the caller's, 4408 idle, 4429 the client reads too slowly (its send buffer stayed full), 1013 the
session service is unavailable, 1001 the server is shutting down, 1011 an internal error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from urllib.parse import unquote, urlsplit

import grpc
from google.protobuf import json_format
from parley.session.v1 import session_pb2, session_pb2_grpc
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from services.core import channels
from services.core.config import CommonSettings
from services.session.settings import SessionSettings

log = logging.getLogger("parley.session")

PATH = re.compile(r"^/v1/sessions/([^/:]+):connect$")
UNAUTHENTICATED, FORBIDDEN, NOT_FOUND, IDLE, TOO_SLOW, INTERNAL = 4401, 4403, 4404, 4408, 4429, 1011
CLOSE_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: 4400,
    grpc.StatusCode.UNAVAILABLE: 1013,
    grpc.StatusCode.DEADLINE_EXCEEDED: 1013,
}
# Request headers passed on to the Converse call: the request's id and trace context.
FORWARDED_HEADERS = ("x-request-id", "traceparent", "tracestate")
# The websockets library logs every connection at INFO, Envoy's health checks of this port (two a
# second) included; its warnings and errors are kept.
QUIET = logging.getLogger("websockets.server")
QUIET.setLevel(logging.WARNING)
CLOSE_TIMEOUT_SECONDS = 2.0  # a close frame stuck behind a full buffer: the connection is dropped
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class TooSlow(Exception):
    """The client did not read its messages within the send timeout."""


def event_json(response: session_pb2.ConverseResponse) -> str:
    kind = response.WhichOneof("event")
    fields = json_format.MessageToDict(getattr(response, kind), preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    return json.dumps({"type": kind, **fields}, ensure_ascii=False)


def error_json(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message, "retry_after_seconds": 0})


def client_request(data: str | bytes) -> session_pb2.ConverseRequest | str:
    """The Converse request a client message asks for, "ping", or raises ValueError saying what is wrong."""
    if isinstance(data, bytes):
        raise ValueError("messages are JSON text, not binary")
    try:
        message = json.loads(data)
    except json.JSONDecodeError:
        raise ValueError("a message must be a JSON object") from None
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    kind = message.pop("type", None)
    if kind == "ping":
        return "ping"
    if kind == "stop":
        return session_pb2.ConverseRequest(stop=session_pb2.ConverseStop())
    if kind == "chat":
        try:
            chat = json_format.ParseDict(message, session_pb2.ChatRequest())
        except json_format.ParseError as exc:
            raise ValueError(f"chat: {exc}") from None
        return session_pb2.ConverseRequest(chat=chat)
    if kind == "auth":
        raise ValueError("already authenticated")
    raise ValueError('"type" must be chat, stop or ping')


def _host_port(netloc: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) of `netloc`, the scheme's default port when it names none; None if malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port or DEFAULT_PORTS[scheme]
    except (ValueError, KeyError):
        return None
    return (parts.hostname, port) if parts.hostname else None


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a page of `origin` may open a socket on a request that came to `host` (its Host
    header): no Origin (not a browser), the same host and port, or a listed origin."""
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in {entry.strip().rstrip("/").lower() for entry in allowed}:
        return True
    scheme, _, netloc = origin.partition("://")
    own = _host_port(netloc, scheme) if netloc and "/" not in netloc else None
    return own is not None and host is not None and own == _host_port(host.strip(), scheme)


class WebSocketBridge:
    def __init__(self, common: CommonSettings, settings: SessionSettings) -> None:
        self.settings = settings
        self.host = common.host
        self.port = common.session_websocket_port
        # This process's own gRPC server (the bridge runs beside it), whatever the session target says.
        wildcard = common.host in ("", "0.0.0.0", "::")
        own = f"{'127.0.0.1' if wildcard else common.host}:{common.session_port}"
        self._channel = channels.open_channel(dataclasses.replace(common, session_target=own), "session")
        self._stub = session_pb2_grpc.SessionServiceStub(self._channel)
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await serve(
            self._handle, self.host, self.port, process_request=self._process_request,
            max_size=self.settings.websocket_max_message_bytes, write_limit=self.settings.websocket_send_buffer_bytes,
            max_queue=16, compression=None, server_header=None, close_timeout=CLOSE_TIMEOUT_SECONDS,
            logger=QUIET)
        log.info("websocket bridge listening", extra={"fields": {"address": f"{self.host}:{self.port}"}})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()  # open sockets get 1001 (going away)
            await self._server.wait_closed()
        await self._channel.close()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":  # Envoy's health check of this cluster
            return connection.respond(200, "ok\n")
        if not PATH.match(path):
            return connection.respond(404, "no WebSocket here; connect to /v1/sessions/{id}:connect\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        match = PATH.match(urlsplit(ws.request.path).path)
        assert match is not None  # _process_request refused other paths
        origin = ws.request.headers.get("origin")
        if not origin_allowed(origin, ws.request.headers.get("host"), self.settings.cors_origins):
            log.warning("websocket refused: foreign origin", extra={"fields": {"origin": origin}})
            await _close(ws, FORBIDDEN, f"a page of origin {origin} may not open this WebSocket (PARLEY_CORS_ORIGINS)")
            return
        credential = await self._credential(ws)
        if credential is None:
            return
        metadata = [("authorization", credential)]
        metadata += [(name, value) for name in FORWARDED_HEADERS if (value := ws.request.headers.get(name))]
        call = self._stub.Converse(metadata=tuple(metadata))
        try:
            await call.write(session_pb2.ConverseRequest(open=session_pb2.ConverseOpen(session_id=unquote(match[1]))))
            ready = await call.read()
            if ready is grpc.aio.EOF:
                raise ConnectionError("the session service ended the stream")
            await ws.send(event_json(ready))
            await self._relay(ws, call)
        except grpc.aio.AioRpcError as exc:
            await _close(ws, CLOSE_CODES.get(exc.code(), INTERNAL), exc.details() or exc.code().name)
        except TooSlow:
            call.cancel()  # first: the close below may wait for a client that does not read
            log.warning("websocket closed: the client reads too slowly")
            await _close(ws, TOO_SLOW, "the client reads too slowly: its send buffer stayed full")
        except ConnectionClosed:
            pass
        except Exception:  # noqa: BLE001 - logged once; the client gets 1011
            log.exception("websocket bridge failed")
            await _close(ws, INTERNAL, "internal error")
        finally:
            call.cancel()  # a client that left ends its turn (the partial answer is kept)

    async def _credential(self, ws: ServerConnection) -> str | None:
        """`Bearer <credential>` from the header or the first message; None once the socket is closed."""
        header = ws.request.headers.get("authorization")
        if header:
            return header  # checked by the identity interceptor: a bad one ends the call UNAUTHENTICATED
        limit = self.settings.websocket_auth_seconds
        try:
            data = await asyncio.wait_for(ws.recv(), limit)
        except TimeoutError:
            await _close(ws, UNAUTHENTICATED, f'send {{"type": "auth", "token": ...}} within {limit:g} s')
            return None
        except ConnectionClosed:
            return None
        try:
            message = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            message = None
        token = message.get("token") if isinstance(message, dict) and message.get("type") == "auth" else None
        if not isinstance(token, str) or not token.strip():
            await _close(ws, UNAUTHENTICATED, 'the first message must be {"type": "auth", "token": ...}')
            return None
        return f"Bearer {token.strip()}"

    async def _relay(self, ws: ServerConnection, call: grpc.aio.StreamStreamCall) -> None:
        """Client messages to the call and its events to the client, until either side ends or the
        socket has been idle for PARLEY_WEBSOCKET_IDLE_SECONDS."""
        last = time.monotonic()
        # Turns asked for and not yet ended: each chat ends with exactly one done or error event
        # (a refused one too). A socket waiting for its answer — even in a long queue — is not idle.
        open_turns = 0

        async def upstream() -> None:
            nonlocal last, open_turns
            async for data in ws:
                last = time.monotonic()
                try:
                    request = client_request(data)
                except ValueError as exc:
                    await self._send(ws, error_json("INVALID_ARGUMENT", str(exc)))
                    continue
                if request == "ping":
                    await self._send(ws, '{"type": "pong"}')
                else:
                    open_turns += request.HasField("chat")
                    await call.write(request)

        async def downstream() -> None:
            nonlocal last, open_turns
            while (event := await call.read()) is not grpc.aio.EOF:
                last = time.monotonic()
                open_turns -= event.WhichOneof("event") in ("done", "error")
                await self._send(ws, event_json(event))

        async def idle() -> None:
            limit = self.settings.websocket_idle_seconds
            while (left := last + limit - time.monotonic()) > 0 or open_turns > 0:
                await asyncio.sleep(max(left, limit / 10))
            await _close(ws, IDLE, f"idle for {limit:g} s")

        tasks = [asyncio.ensure_future(job()) for job in (upstream, downstream, idle)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        for task in done:
            if (exc := task.exception()) is not None:
                raise exc

    async def _send(self, ws: ServerConnection, text: str) -> None:
        """Sends, waiting while more than the send buffer is unsent — at most the send timeout."""
        try:
            await asyncio.wait_for(ws.send(text), self.settings.websocket_send_timeout_seconds)
        except TimeoutError:
            raise TooSlow() from None


async def _close(ws: ServerConnection, code: int, reason: str) -> None:
    """Closes with `code`; a connection whose close frame cannot get out (a client that does not
    read: the frame waits behind a full buffer) is dropped after CLOSE_TIMEOUT_SECONDS."""
    data = reason.encode()  # a close reason fits in 123 bytes of UTF-8
    reason = reason if len(data) <= 123 else data[:120].decode(errors="ignore") + "…"
    try:
        await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT_SECONDS)
    except TimeoutError:
        ws.transport.abort()
