"""Converse: the turns of one conversation over one bidirectional stream (what a WebSocket carries,
through services/session/websocket.py).

The first request opens one of the caller's sessions (another user's is NOT_FOUND, the stream's
status). Then each `chat` runs a turn through SessionService.chat — the same storage, the same
409 while a turn runs (on this stream or any other), the same rate limits — and its events flow
back as they come; `stop` cancels the running turn, which saves its partial answer as incomplete
(as a client that leaves an SSE turn does) and ends with `done` whose finish reason is
FINISH_REASON_CANCELLED. Errors of a turn are `error` events and the stream stays open. When the
stream ends (the client left), the running turn is cancelled the same way. Each chat checks the
caller's credential again first: one that has expired or been revoked since the stream opened ends
the stream UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from parley.inference.v1 import inference_pb2
from parley.session.v1 import session_pb2

from services.core.errors import Aborted, InvalidArgument, ParleyError, Unauthenticated, reason_of, status_of
from services.core.identity import reauthenticate
from services.session.service import SessionService
from services.session.turns import BUSY

log = logging.getLogger("parley.session")

_CLOSED = object()  # the client's side of the stream ended


def error_event(exc: BaseException) -> session_pb2.ConverseResponse:
    """A turn's failure as an event: its status name and message, and for RESOURCE_EXHAUSTED the
    seconds to wait (the Retry-After an HTTP client would get)."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("turn failed", exc_info=exc)
    retry_after = 0.0
    if isinstance(exc, ParleyError) and exc.retry_after is not None:
        retry_after = exc.retry_after
    elif isinstance(exc, grpc.aio.AioRpcError):
        for key, value in exc.trailing_metadata() or ():
            if key == "retry-after" and str(value).isdigit():
                retry_after = float(value)
    return session_pb2.ConverseResponse(error=session_pb2.ChatError(
        code=code.name, message=message, retry_after_seconds=math.ceil(retry_after) if retry_after else 0,
        reason=reason_of(exc)))


def converse_event(event: session_pb2.ChatResponse) -> session_pb2.ConverseResponse:
    kind = event.WhichOneof("event")
    return session_pb2.ConverseResponse(**{kind: getattr(event, kind)})


class Conversation:
    """One Converse stream: reads the client's requests and the running turn's events into one
    inbox and answers them in order. At most one turn runs; events of a turn that was stopped are
    dropped once its `done` has been sent."""

    def __init__(self, service: SessionService) -> None:
        self.service = service
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._turn: asyncio.Task[None] | None = None
        self._number = 0  # the running turn's number; events carry theirs
        self._answered = False  # the running turn's done or error has been sent: it is only tidying up

    async def run(self, requests: AsyncIterator[session_pb2.ConverseRequest]) -> AsyncIterator[session_pb2.ConverseResponse]:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("action") != "open":
            raise InvalidArgument("the first message of Converse must be `open` with a session_id")
        session = await self.service.get_session(first.open.session_id)  # NOT_FOUND unless the caller's
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            yield session_pb2.ConverseResponse(ready=session_pb2.ConverseReady(session_id=session.id))
            closing = False
            while not (closing and self._turn is None):
                item = await self._inbox.get()
                if item is _CLOSED:
                    closing = True
                elif isinstance(item, tuple):  # (turn number, event or None when the turn ended)
                    number, event = item
                    if number != self._number:
                        continue
                    if event is None:
                        self._turn = None
                    else:
                        self._answered = event.WhichOneof("event") in ("done", "error")
                        yield event
                else:
                    for event in await self._act(item, session.id):
                        yield event
        finally:
            reader.cancel()
            await self._cancel_turn()

    async def _read(self, requests: AsyncIterator[session_pb2.ConverseRequest]) -> None:
        try:
            async for request in requests:
                self._inbox.put_nowait(request)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self._inbox.put_nowait(_CLOSED)

    async def _act(self, request: session_pb2.ConverseRequest, session_id: str) -> list[session_pb2.ConverseResponse]:
        action = request.WhichOneof("action")
        if action == "chat":
            chat = request.chat
            if chat.session_id and chat.session_id != session_id:
                return [error_event(InvalidArgument("this stream converses in session "
                                                    f"{session_id!r}; open another for {chat.session_id!r}"))]
            if self._turn is not None and self._answered:
                # The client has the last answer's end; that turn is saving it and releasing the
                # session. The next turn starts once it has (milliseconds), not refused with 409.
                await asyncio.wait({self._turn})
                self._turn = None
            if self._turn is not None:
                return [error_event(Aborted(BUSY))]
            # The stream may outlive the credential it opened with: an expired access token or a
            # revoked API key ends it UNAUTHENTICATED here, before the turn stores anything (the
            # WebSocket closes with 4401; the client reconnects with a fresh token and sends again).
            try:
                await reauthenticate()
            except Unauthenticated:
                raise
            except ParleyError as exc:  # the auth service is down: this turn is refused, the stream stays
                return [error_event(exc)]
            chat.session_id = session_id
            self._number += 1
            self._answered = False
            self._turn = asyncio.get_running_loop().create_task(self._run_turn(self._number, chat))
            return []
        if action == "stop":
            if self._turn is None:
                return []
            await self._cancel_turn()
            self._number += 1  # whatever the stopped turn had queued is dropped
            return [session_pb2.ConverseResponse(done=session_pb2.ChatDone(
                finish_reason=inference_pb2.FINISH_REASON_CANCELLED))]
        return [error_event(InvalidArgument("`open` comes once, first" if action == "open"
                                            else "a message needs one of chat or stop"))]

    async def _run_turn(self, number: int, chat: session_pb2.ChatRequest) -> None:
        try:
            async with contextlib.aclosing(self.service.chat(chat)) as events:
                async for event in events:
                    self._inbox.put_nowait((number, converse_event(event)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a turn's failure is an event; the stream goes on
            self._inbox.put_nowait((number, error_event(exc)))
        finally:
            self._inbox.put_nowait((number, None))  # the turn is over, however it ended

    async def _cancel_turn(self) -> None:
        """Cancels the running turn and waits until it has saved its partial answer and released the
        session, so that the next turn may start at once."""
        turn, self._turn = self._turn, None
        if turn is None or turn.done():
            return
        turn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({turn})
