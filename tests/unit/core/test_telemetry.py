"""Telemetry in-process: one trace across two services, traceparent and request id propagation, RPC
metrics by status code, trace ids in log lines, the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from parley.cache.v1 import cache_pb2, cache_pb2_grpc
from parley.inference.v1 import inference_pb2, inference_pb2_grpc
from prometheus_client import REGISTRY

from services.core import channels, config, errors, logs, telemetry
from services.core.server import Registration, RunningServer, ServiceSpec, start_server
from services.stack import free_port
from tests.unit import spans as captured

CACHE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
FRONT_METHOD = f"{CACHE}/GetCacheStats"
BACK_METHOD = f"{INFERENCE}/Generate"

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
GATEWAY_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{GATEWAY_SPAN_ID:016x}-01"


class Back(inference_pb2_grpc.InferenceServiceServicer):
    """Streams two chunks, or raises what the test asks for; remembers the metadata it got."""

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}
        self.raise_this: BaseException | None = None
        self.hold: asyncio.Event | None = None  # when set, the stream waits for it after one chunk

    async def Generate(self, request, context) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.metadata = {k: v for k, v in context.invocation_metadata()}
        if self.raise_this is not None:
            raise self.raise_this
        yield inference_pb2.GenerateResponse(text="Hel")
        if self.hold is not None:
            await self.hold.wait()
        yield inference_pb2.GenerateResponse(text="lo", finish_reason=inference_pb2.FINISH_REASON_STOP)


class Front(cache_pb2_grpc.CacheServiceServicer):
    """Calls the back service through core.channels, as session calls inference."""

    def __init__(self, common: config.CommonSettings) -> None:
        self.back = inference_pb2_grpc.InferenceServiceStub(channels.open_channel(common, "inference"))

    async def GetCacheStats(self, request, context) -> cache_pb2.GetCacheStatsResponse:
        text = "".join([r.text async for r in self.back.Generate(inference_pb2.GenerateRequest(prompt="Hi"))])
        return cache_pb2.GetCacheStatsResponse(backend=text)


@pytest.fixture
def exporter():
    exporter = captured.exporter()
    exporter.clear()
    return exporter


@pytest.fixture
def rpc_log() -> Iterator[list[dict]]:
    """JSON log lines of the per-RPC logger, as the services write them."""
    lines: list[dict] = []
    formatter = logs.JsonFormatter()

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    logger = logging.getLogger("parley.rpc")
    handler, level = Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
async def services() -> AsyncIterator[tuple[RunningServer, RunningServer, Back]]:
    behaviour = Back()
    back = await start_server(ServiceSpec("inference", [
        Registration(INFERENCE, inference_pb2_grpc.add_InferenceServiceServicer_to_server, behaviour)]))
    common = config.load(config.CommonSettings, {"PARLEY_INFERENCE_TARGET": f"127.0.0.1:{back.port}"})
    front = await start_server(ServiceSpec("cache", [
        Registration(CACHE, cache_pb2_grpc.add_CacheServiceServicer_to_server, Front(common))]))
    yield front, back, behaviour
    await front.stop(0)
    await back.stop(0)


def counted(method: str, code: str) -> float:
    service, name = method.rsplit("/", 1)
    labels = {"grpc_service": service, "grpc_method": name, "grpc_code": code}
    return REGISTRY.get_sample_value("parley_rpc_server_requests_total", labels) or 0.0


async def finished(exporter, count: int) -> tuple[ReadableSpan, ...]:
    # Client spans end on the call's done callback, a loop iteration after the caller has its answer.
    for _ in range(100):
        spans = exporter.get_finished_spans()
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.01)
    return exporter.get_finished_spans()


async def test_one_trace_across_two_services_continues_the_gateways_traceparent(services, exporter, rpc_log) -> None:
    front, _, back = services
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        reply = await cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(
            cache_pb2.GetCacheStatsRequest(), metadata=(("traceparent", TRACEPARENT), ("x-request-id", "req-42")))
    assert reply.backend == "Hello"

    spans = await finished(exporter, 3)
    (front_server,) = captured.named(spans, FRONT_METHOD)
    client, back_server = sorted(captured.named(spans, BACK_METHOD), key=lambda s: s.kind.value, reverse=True)
    assert (front_server.kind, client.kind, back_server.kind) == (
        trace.SpanKind.SERVER, trace.SpanKind.CLIENT, trace.SpanKind.SERVER)
    # One trace: the gateway's span -> front's server span -> its client span -> back's server span.
    assert {s.context.trace_id for s in (front_server, client, back_server)} == {TRACE_ID}
    assert front_server.parent.span_id == GATEWAY_SPAN_ID and front_server.parent.is_remote
    assert client.parent.span_id == front_server.context.span_id
    assert back_server.parent.span_id == client.context.span_id
    assert back.metadata["traceparent"].split("-")[1:3] == [f"{TRACE_ID:032x}", f"{client.context.span_id:016x}"]
    # Envoy's request id travels on to the next service.
    assert back.metadata["x-request-id"] == "req-42"

    assert dict(back_server.attributes) == {"rpc.system": "grpc", "rpc.service": INFERENCE, "rpc.method": "Generate",
                                            "rpc.grpc.status_code": 0}
    assert client.attributes["rpc.grpc.status_code"] == 0

    # Each service logs its RPC with the trace, its own span and the request id.
    by_method = {line["method"]: line for line in rpc_log}
    assert by_method[f"/{BACK_METHOD}"]["trace_id"] == f"{TRACE_ID:032x}"
    assert by_method[f"/{BACK_METHOD}"]["span_id"] == f"{back_server.context.span_id:016x}"
    assert by_method[f"/{FRONT_METHOD}"]["request_id"] == "req-42"
    assert by_method[f"/{FRONT_METHOD}"]["code"] == "OK"


async def test_a_call_without_traceparent_starts_a_trace(services, exporter) -> None:
    front, _, _ = services
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        await cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(cache_pb2.GetCacheStatsRequest())
    spans = await finished(exporter, 3)
    (front_server,) = captured.named(spans, FRONT_METHOD)
    assert front_server.parent is None
    assert {s.context.trace_id for s in spans} == {front_server.context.trace_id}


@pytest.mark.parametrize(("raised", "code", "server_fault"), [
    (errors.NotFound("no such model"), grpc.StatusCode.NOT_FOUND, False),
    (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, True),
])
async def test_status_codes_reach_spans_and_metrics(services, exporter, raised, code, server_fault) -> None:
    _, back_server, back = services
    back.raise_this = raised
    before = counted(BACK_METHOD, code.name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{back_server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in inference_pb2_grpc.InferenceServiceStub(channel).Generate(inference_pb2.GenerateRequest()):
                pass
    assert caught.value.code() == code
    assert counted(BACK_METHOD, code.name) == before + 1
    (span,) = captured.named(await finished(exporter, 1), BACK_METHOD)
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    # Client mistakes are not server errors (RPC semantic conventions); bugs are.
    assert (span.status.status_code == trace.StatusCode.ERROR) is server_fault


async def test_a_cancelled_stream_is_counted_as_cancelled(services, exporter) -> None:
    _, back_server, back = services
    back.hold = asyncio.Event()
    before = counted(BACK_METHOD, "CANCELLED")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{back_server.port}") as channel:
        call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(inference_pb2.GenerateRequest())
        await call.read()
        call.cancel()
        for _ in range(100):
            if counted(BACK_METHOD, "CANCELLED") > before:
                break
            await asyncio.sleep(0.01)
    assert counted(BACK_METHOD, "CANCELLED") == before + 1


async def test_health_checks_are_neither_traced_nor_counted(services, exporter) -> None:
    front, _, _ = services
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert exporter.get_finished_spans() == ()
    assert counted("grpc.health.v1.Health/Check", "OK") == 0


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    port = free_port()
    stop = telemetry.serve_metrics("127.0.0.1", port)
    assert stop is not None
    try:
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{port}/metrics")
        assert answer.status_code == 200
        assert "# TYPE parley_rpc_server_requests_total counter" in answer.text
        assert "# TYPE parley_rpc_server_duration_seconds histogram" in answer.text
    finally:
        stop()
    assert telemetry.serve_metrics("127.0.0.1", 0) is None


def test_metrics_ports_have_one_setting_per_service() -> None:
    settings = config.load(telemetry.TelemetrySettings, {"PARLEY_INFERENCE_METRICS_PORT": "0"})
    assert settings.metrics_port_of("inference") == 0
    assert settings.metrics_port_of("auth") == 9461
    with pytest.raises(config.ConfigError, match="PARLEY_CACHE_METRICS_PORT"):
        config.load(telemetry.TelemetrySettings, {"PARLEY_CACHE_METRICS_PORT": "70000"})


async def test_a_stream_closed_from_another_context_ends_its_span_without_a_context_error(exporter, caplog) -> None:
    """grpc.aio may close a server stream's generator from outside the task that ran it (the client
    left, or the loop's async-generator finalizer): the span still ends, and OpenTelemetry does not log
    "Failed to detach context" at ERROR for each such stream (soak runs showed dozens)."""

    class Context:
        def invocation_metadata(self) -> tuple:
            return ()

        def code(self) -> None:
            return None

    async def two_chunks(request, context) -> AsyncIterator[str]:
        yield "one"
        yield "two"

    stream = telemetry._wrap_stream(two_chunks, BACK_METHOD)(None, Context())
    assert await stream.__anext__() == "one"  # attached in this task's context
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        await asyncio.create_task(stream.aclose(), context=contextvars.Context())  # closed from elsewhere
    assert [r.getMessage() for r in caplog.records if r.name == "opentelemetry.context"] == []
    span = (await finished(exporter, 1))[-1]
    assert span.name == BACK_METHOD and span.end_time is not None
