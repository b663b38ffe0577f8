"""The one place exceptions become gRPC statuses.

Handlers raise domain exceptions (core.errors); this interceptor aborts the call with the precise
code and message. Anything else is a bug: it is logged once with its traceback and the caller gets
INTERNAL without internals. ResourceExhausted.retry_after travels as `retry-after` metadata, which
Envoy turns into a Retry-After header; ParleyError.reason as `parley-reason` (the gateway makes it
the OpenAI error's code).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.core.errors import REASON_METADATA, InvalidArgument, ParleyError, reason_of, status_of

log = logging.getLogger("parley.rpc")


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Aborts the call for `exc` (always raises)."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unhandled error in %s", method, exc_info=exc, extra={"fields": {"method": method}})
    retry_after = getattr(exc, "retry_after", None) if isinstance(exc, ParleyError) else None
    metadata: list[tuple[str, str]] = []
    if retry_after is not None:
        metadata.append(("retry-after", str(max(1, math.ceil(retry_after)))))
    elif isinstance(exc, grpc.aio.AioRpcError):
        # A downstream service's answer passed on (status_of): its Retry-After goes along.
        metadata += [(k, v) for k, v in (exc.trailing_metadata() or ()) if k == "retry-after"]
    reason = reason_of(exc)
    if reason:
        metadata.append((REASON_METADATA, reason))
    if metadata:
        context.set_trailing_metadata(tuple(metadata))
    await context.abort(code, message)


class Undecodable:
    """What a request that does not parse becomes, so that its handler answers INVALID_ARGUMENT
    (gRPC itself would answer UNKNOWN naming the parser's exception, which Envoy makes a 500)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def check(self) -> None:
        words = "a text field is not valid UTF-8" if "UTF-8" in str(self.error) else "it is not a valid message"
        raise InvalidArgument(f"the request could not be read: {words}")


def _decoding(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(exc)

    return decode


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                request.check()
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status right here
            await abort_with(context, exc, method)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if isinstance(request, Undecodable):
                request.check()
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status right here
            await abort_with(context, exc, method)

    return handler


Wrap = Callable[[Callable[..., Any], str], Callable[..., Any]]


def rewrap(handler: grpc.RpcMethodHandler, method: str, unary: Wrap, stream: Wrap) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is wrapped: `unary` for methods returning one message,
    `stream` for server-streaming ones. Every Parley interceptor builds its handlers here, through
    WrappingInterceptor."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, method), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream, method), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, method), **codec)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream, method), **codec)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's behaviour (the shape of every Parley
    interceptor): subclasses give `wrap_unary` and `wrap_stream`, and may leave methods alone."""

    wrap_unary: Wrap
    wrap_stream: Wrap

    def passes_through(self, method: str) -> bool:
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.passes_through(method):
            return handler
        return rewrap(handler, method, self.wrap_unary, self.wrap_stream)


class ErrorMappingInterceptor(WrappingInterceptor):
    wrap_unary = staticmethod(_wrap_unary)
    wrap_stream = staticmethod(_wrap_stream)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # The innermost interceptor: the interceptors around it pass its deserializer on unchanged.
        handler = await super().intercept_service(continuation, handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        return handler._replace(request_deserializer=_decoding(handler.request_deserializer))
