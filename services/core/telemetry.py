"""Traces, RPC metrics and the metrics endpoint: what every Parley service shares, set up once.

- Tracing (OpenTelemetry): one TracerProvider per process, `service.name` = parley-<service>. Spans
  leave the process only when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is
  set: then an OTLP/gRPC exporter, configured by the standard OTEL_EXPORTER_OTLP_* variables, sends
  them in batches. Otherwise spans still exist, so log lines carry trace ids, but nothing is exported.
- `ServerTelemetry`, the outermost server interceptor: a SERVER span per RPC named
  `pkg.Service/Method` with the RPC semantic-convention attributes, continuing the caller's W3C
  `traceparent`; RPC count and latency by method and status code; one log line per RPC; Envoy's
  `x-request-id` on every log record of the call.
- `client_interceptors()`, on every channel from core.channels.open_channel: a CLIENT span per outgoing call,
  whose context travels in `traceparent` metadata (and the request id in `x-request-id`), so one chat
  turn session -> cache -> inference is one trace.
- Prometheus metrics on PARLEY_<SERVICE>_METRICS_PORT (0 disables), path /metrics.

Health checks and reflection are left out of spans, metrics and logs: Envoy probes every second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import prometheus_client
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.core import logs
from services.core.config import setting
from services.core.interceptors import WrappingInterceptor

log = logging.getLogger("parley.rpc")

TRACER_NAME = "parley"
REQUEST_ID = "x-request-id"
UNTRACED_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# Seconds; LLM streams run long, so the buckets reach minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

RPC_REQUESTS = prometheus_client.Counter(
    "parley_rpc_server_requests_total", "RPCs handled, by method and gRPC status code",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_DURATION = prometheus_client.Histogram(
    "parley_rpc_server_duration_seconds", "Time from an RPC's arrival to its status (whole stream for streaming RPCs)",
    ["grpc_service", "grpc_method", "grpc_code"], buckets=LATENCY_BUCKETS,
)


@dataclasses.dataclass(frozen=True)
class TelemetrySettings:
    """Where each service serves /metrics (on PARLEY_HOST). 0 turns a service's endpoint off."""

    auth_metrics_port: int = setting(9461, min=0, max=65535)
    session_metrics_port: int = setting(9462, min=0, max=65535)
    cache_metrics_port: int = setting(9463, min=0, max=65535)
    inference_metrics_port: int = setting(9464, min=0, max=65535)

    def metrics_port_of(self, service: str) -> int:
        return int(getattr(self, f"{service}_metrics_port", 0))


def tracer() -> trace.Tracer:
    # Looked up per use: a provider installed later (serve(), a test) takes effect at once.
    return trace.get_tracer(TRACER_NAME)


def exporting() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service: str) -> TracerProvider | None:
    """Installs this process's TracerProvider (once); with an OTLP exporter only when configured.
    Returns it, or None when a provider was already installed (e.g. by a test)."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: f"parley-{service}",
                                                        "service.namespace": "parley"}))
    if exporting():
        # Imported only when used: the exporter pulls in a sync gRPC client.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def serve_metrics(host: str, port: int) -> Callable[[], None] | None:
    """Serves the default Prometheus registry on host:port/metrics in a thread; returns its stop function."""
    if port == 0:
        return None
    try:
        server, _thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port} ({exc.strerror}); set another port or 0") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


def start(service: str, host: str, settings: TelemetrySettings) -> Callable[[], None]:
    """Process start-up: tracing and the metrics endpoint. Returns what flushes and stops them."""
    provider = configure_tracing(service)
    port = settings.metrics_port_of(service)
    stop_metrics = serve_metrics(host, port)
    if stop_metrics is not None:
        log.info("metrics endpoint", extra={"fields": {"address": f"http://{host}:{port}/metrics"}})
    if exporting():
        log.info("exporting traces over OTLP", extra={"fields": {
            "endpoint": os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]}})

    def stop() -> None:
        if stop_metrics is not None:
            stop_metrics()
        if provider is not None:
            provider.shutdown()  # flushes spans still in the batch

    return stop


def split_method(method: str) -> tuple[str, str]:
    """"/pkg.Service/Method" -> ("pkg.Service", "Method")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def rpc_attributes(method: str) -> dict[str, str]:
    service, name = split_method(method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _metadata_dict(metadata: Sequence[Any] | None) -> dict[str, str]:
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}


def _code_name(code: grpc.StatusCode | None) -> str:
    return (code or grpc.StatusCode.UNKNOWN).name


class _ServerCall:
    """One handled RPC: its span, its log fields, its metrics."""

    def __init__(self, method: str, metadata: Mapping[str, str]) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.span = tracer().start_span(
            method.lstrip("/"), context=propagate.extract(metadata), kind=SpanKind.SERVER,
            attributes=rpc_attributes(method),
        )
        self._otel_context = trace.set_span_in_context(self.span)
        self._otel_token = otel_context.attach(self._otel_context)
        request_id = metadata.get(REQUEST_ID)
        self._fields_token = logs.request_fields.set({"request_id": request_id} if request_id else {})

    def finish(self, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
        elapsed = time.perf_counter() - self.started
        service, name = split_method(self.method)
        RPC_REQUESTS.labels(service, name, code.name).inc()
        RPC_DURATION.labels(service, name, code.name).observe(elapsed)
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            # Server spans: only codes that mean a server fault are errors (RPC semantic conventions).
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS):
                self.span.set_status(Status(StatusCode.ERROR, code.name))
            if exc is not None and not isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)):
                self.span.record_exception(exc)
        level = logging.WARNING if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
        log.log(level, "rpc", extra={"fields": {"method": self.method, "code": code.name,
                                                "duration_ms": round(elapsed * 1000, 2)}})
        self.span.end()
        try:
            logs.request_fields.reset(self._fields_token)
        except ValueError:  # finished from another context (a generator closed elsewhere)
            pass
        # A stream's generator closed from another task (grpc.aio's cancellation, the loop's finalizer)
        # runs this in a context where the span was never attached: detaching there would fail and
        # OpenTelemetry would log it at ERROR. The RPC's own context ends with its task anyway.
        if otel_context.get_current() is self._otel_context:
            otel_context.detach(self._otel_token)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _ServerCall(method, _metadata_dict(context.invocation_metadata()))
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            call.finish(_failure_code(exc, context), exc)
            raise
        call.finish(context.code() or grpc.StatusCode.OK)
        return response

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _ServerCall(method, _metadata_dict(context.invocation_metadata()))
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            call.finish(_failure_code(exc, context), exc)
            raise
        call.finish(context.code() or grpc.StatusCode.OK)

    return handler


def _failure_code(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


class ServerTelemetry(WrappingInterceptor):
    """Outermost interceptor of every Parley server (see core.server.start_server)."""

    wrap_unary = staticmethod(_wrap_unary)
    wrap_stream = staticmethod(_wrap_stream)

    def passes_through(self, method: str) -> bool:
        return method.startswith(UNTRACED_PREFIXES)


class _ClientTelemetry:
    """CLIENT span per outgoing call; the span's context and the request id travel as metadata."""

    _finishing: set[asyncio.Task[None]] = set()  # spans waiting for their call's status

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[trace.Span, grpc.aio.ClientCallDetails]:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        span = tracer().start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=rpc_attributes(method))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [(k, v) for k, v in (details.metadata or ()) if k not in carrier and k != REQUEST_ID]
        metadata.extend(carrier.items())
        request_id = (logs.request_fields.get() or {}).get("request_id")
        if request_id:
            metadata.append((REQUEST_ID, request_id))
        return span, details._replace(metadata=grpc.aio.Metadata(*metadata))

    def _finish_when_done(self, span: trace.Span, call: Any) -> Any:
        def done(finished: Any) -> None:
            end = time.time_ns()
            task = asyncio.ensure_future(self._end(span, finished, end))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

        call.add_done_callback(done)
        return call

    @staticmethod
    async def _end(span: trace.Span, call: Any, end: int) -> None:
        try:
            code = await call.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end(end_time=end)

    async def _intercept(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        span, details = self._start(details)
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        return self._finish_when_done(span, call)


# grpc.aio files each interceptor under the first of the four kinds it is: one class per kind.
class _UnaryUnary(_ClientTelemetry, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStream(_ClientTelemetry, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnary(_ClientTelemetry, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStream(_ClientTelemetry, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For every channel (core.channels): client spans and trace propagation on all four call kinds."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]
