"""The URL's id is the only id: a REST request whose body (or query) names another resource than its
path is refused with INVALID_ARGUMENT, for every method whose google.api.http binding has a variable.

Envoy's transcoder fills one request message from the path's variables, the query and the body;
where two give the same field, the body won (`PATCH /v1/sessions/A` with `{"id": "B"}` acted on B).
The transcoder records the URL it came from in `x-envoy-original-path`; this interceptor matches it
against the method's binding, read from the descriptors, and compares each variable with the field
it fills. gRPC callers have no URL: their message is the only source of its fields.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from services.core.errors import InvalidArgument
from services.core.interceptors import WrappingInterceptor, abort_with

ORIGINAL_PATH = "x-envoy-original-path"
_VARIABLE = re.compile(r"\{([A-Za-z0-9_.]+)(?:=[^}]*)?\}")


@functools.cache
def bindings(method: str) -> tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]:
    """For a gRPC method name (/package.Service/Method): each of its HTTP path templates as a
    pattern, with the field each variable fills, in order."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return ()
    rule = descriptor.GetOptions().Extensions[annotations_pb2.http]
    found = []
    for binding in (rule, *rule.additional_bindings):
        template = getattr(binding, binding.WhichOneof("pattern") or "get", "")
        if isinstance(template, Message):  # custom: {kind, path}
            template = template.path
        fields = tuple(_VARIABLE.findall(template))
        if fields:
            found.append((_pattern(template), fields))
    return tuple(found)


def _pattern(template: str) -> re.Pattern[str]:
    parts, at = [], 0
    for match in _VARIABLE.finditer(template):
        parts.append(re.escape(template[at:match.start()]))
        # One segment, or several for {name=a/**}; the shortest that lets a :verb follow.
        parts.append("(.+?)" if "=" in match.group(0) and "**" in match.group(0) else "([^/]+?)")
        at = match.end()
    parts.append(re.escape(template[at:]))
    return re.compile("".join(parts) + "$")


def _field(message: Message, dotted: str) -> Any:
    value: Any = message
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def check(method: str, url: str, request: Message) -> None:
    """Raises InvalidArgument when a field that a variable of `url` fills holds another value."""
    path = url.partition("?")[0]
    for pattern, fields in bindings(method):
        match = pattern.match(path)
        if match is None:
            continue
        for name, raw in zip(fields, match.groups()):
            from_url = urllib.parse.unquote(raw, errors="replace")
            value = _field(request, name)
            if str(value) != from_url:
                raise InvalidArgument(
                    f"{name} is {_short(value)} in the request body but {_short(from_url)} in the URL; "
                    "a request acts only on what its URL names (leave the field out of the body)")
        return


def _short(value: Any) -> str:
    text = repr(str(value))
    return text if len(text) <= 80 else text[:77] + "...'"


def _url(context: grpc.aio.ServicerContext) -> str | None:
    return next((v for k, v in context.invocation_metadata() or () if k == ORIGINAL_PATH), None)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        url = _url(context)
        if url is not None and isinstance(request, Message):
            try:
                check(method, url, request)
            except InvalidArgument as exc:
                await abort_with(context, exc, method)
        return await behavior(request, context)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        url = _url(context)
        if url is not None and isinstance(request, Message):
            try:
                check(method, url, request)
            except InvalidArgument as exc:
                await abort_with(context, exc, method)
        async for item in behavior(request, context):
            yield item

    return handler


class PathIdInterceptor(WrappingInterceptor):
    """Refuses a transcoded request whose fields disagree with its URL's variables (see above).
    Methods without a variable in their binding pass through untouched."""

    wrap_unary = staticmethod(_wrap_unary)
    wrap_stream = staticmethod(_wrap_stream)

    def passes_through(self, method: str) -> bool:
        return not bindings(method)
