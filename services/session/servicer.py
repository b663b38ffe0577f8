"""gRPC <-> domain translation for the session service; behaviour lives in service.py and store.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from google.api import httpbody_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from parley.session.v1 import session_pb2, session_pb2_grpc

from services.core.structured import calls_to_proto
from services.session.conversation import Conversation
from services.session.responses import Responses
from services.wire.openai_response_events import JSON
from services.session.rules import sampling_from_dict
from services.session.service import SessionService
from services.session.records import (
    ROLE_ASSISTANT, ROLE_TOOL, ROLE_USER, STATUS_COMPLETE, STATUS_ERROR, STATUS_INCOMPLETE, MessageRecord,
    SessionRecord,
)

ROLES = {ROLE_USER: session_pb2.MESSAGE_ROLE_USER, ROLE_ASSISTANT: session_pb2.MESSAGE_ROLE_ASSISTANT,
         ROLE_TOOL: session_pb2.MESSAGE_ROLE_TOOL}
STATUSES = {
    STATUS_COMPLETE: session_pb2.MESSAGE_STATUS_COMPLETE,
    STATUS_INCOMPLETE: session_pb2.MESSAGE_STATUS_INCOMPLETE,
    STATUS_ERROR: session_pb2.MESSAGE_STATUS_ERROR,
}


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def session_pb(record: SessionRecord) -> session_pb2.Session:
    return session_pb2.Session(
        id=record.id, title=record.title, model=record.model, system_prompt=record.system_prompt,
        sampling=sampling_from_dict(record.sampling), create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
    )


def message_pb(record: MessageRecord) -> session_pb2.Message:
    return session_pb2.Message(
        id=record.id, session_id=record.session_id, role=ROLES[record.role], content=record.content,
        model=record.model, prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
        status=STATUSES[record.status], error=record.error, create_time=timestamp(record.created_at),
        tool_calls=calls_to_proto(record.tool_calls), tool_call_id=record.tool_call_id,
        reasoning=record.reasoning, reasoning_tokens=record.reasoning_tokens,
    )


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, service: SessionService) -> None:
        self.service = service
        self.responses = Responses(service)

    async def CreateSession(self, request: session_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext) -> session_pb2.Session:
        return session_pb(await self.service.create_session(request.session))

    async def ListSessions(self, request: session_pb2.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> session_pb2.ListSessionsResponse:
        rows, token = await self.service.list_sessions(request.page_size, request.page_token)
        return session_pb2.ListSessionsResponse(sessions=[session_pb(r) for r in rows], next_page_token=token)

    async def GetSession(self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext) -> session_pb2.Session:
        return session_pb(await self.service.get_session(request.id))

    async def UpdateSession(self, request: session_pb2.UpdateSessionRequest, context: grpc.aio.ServicerContext) -> session_pb2.Session:
        return session_pb(await self.service.update_session(request.session, list(request.update_mask.paths)))

    async def DeleteSession(self, request: session_pb2.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> session_pb2.DeleteSessionResponse:
        await self.service.delete_session(request.id)
        return session_pb2.DeleteSessionResponse()

    async def ListMessages(self, request: session_pb2.ListMessagesRequest,
                           context: grpc.aio.ServicerContext) -> session_pb2.ListMessagesResponse:
        rows, token = await self.service.list_messages(request.session_id, request.page_size, request.page_token)
        return session_pb2.ListMessagesResponse(messages=[message_pb(r) for r in rows], next_page_token=token)

    async def Chat(self, request: session_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[session_pb2.ChatResponse]:
        async with contextlib.aclosing(self.service.chat(request)) as events:  # closed with this stream
            async for event in events:
                yield event

    async def Converse(self, request_iterator: AsyncIterator[session_pb2.ConverseRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[session_pb2.ConverseResponse]:
        async with contextlib.aclosing(Conversation(self.service).run(request_iterator)) as events:
            async for event in events:
                yield event

    # The OpenAI Responses API: OpenAI's JSON and SSE bytes, passed through by the gateway.

    async def CreateResponse(self, request: session_pb2.CreateResponseRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[httpbody_pb2.HttpBody]:
        # Like OpenAI's own API, the body must be JSON whatever content type the client declared.
        async with contextlib.aclosing(self.responses.create(request.http_body.data)) as parts:
            async for content_type, data in parts:
                yield httpbody_pb2.HttpBody(content_type=content_type, data=data)

    async def GetResponse(self, request: session_pb2.GetResponseRequest,
                          context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type=JSON, data=await self.responses.get(request.id))

    async def DeleteResponse(self, request: session_pb2.DeleteResponseRequest,
                             context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type=JSON, data=await self.responses.delete(request.id))

    async def ListResponseInputItems(self, request: session_pb2.ListResponseInputItemsRequest,
                                     context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        data = await self.responses.input_items(request.id, request.limit, request.order, request.after)
        return httpbody_pb2.HttpBody(content_type=JSON, data=data)
