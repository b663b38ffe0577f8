"""serve() building blocks in-process: health readiness, reflection, error mapping, graceful drain."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from parley.cache.v1 import cache_pb2, cache_pb2_grpc

from services.core import errors, logs
from services.core.server import Registration, ServiceSpec, start_server

NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


class Behaviour(cache_pb2_grpc.CacheServiceServicer):
    """GetCacheStats raises whatever the test puts in `raise_this`; FlushCache sleeps first."""

    def __init__(self) -> None:
        self.raise_this: BaseException | None = None
        self.flush_started = asyncio.Event()

    async def GetCacheStats(self, request, context):
        if self.raise_this is not None:
            raise self.raise_this
        return cache_pb2.GetCacheStatsResponse(backend="memory")

    async def FlushCache(self, request, context):
        self.flush_started.set()
        await asyncio.sleep(0.5)
        return cache_pb2.FlushCacheResponse(removed=7)


async def _start(behaviour: Behaviour):
    spec = ServiceSpec(name="cache", registrations=[Registration(NAME, cache_pb2_grpc.add_CacheServiceServicer_to_server, behaviour)])
    return await start_server(spec, port=0)


async def test_health_is_not_serving_until_ready() -> None:
    running = await _start(Behaviour())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await running.set_serving(True)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    await running.stop(0)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("bad"), grpc.StatusCode.NOT_FOUND),
        (errors.PermissionDenied("bad"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.Unauthenticated("bad"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.Aborted("bad"), grpc.StatusCode.ABORTED),
        (errors.Unavailable("bad"), grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhausted("bad", retry_after=2.2), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_domain_errors_map_to_precise_codes(exc: Exception, code: grpc.StatusCode) -> None:
    behaviour = Behaviour()
    behaviour.raise_this = exc
    running = await _start(behaviour)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(cache_pb2.GetCacheStatsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == code and info.value.details() == "bad"
    if isinstance(exc, errors.ResourceExhausted):
        assert ("retry-after", "3") in tuple(info.value.trailing_metadata())
    await running.stop(0)


async def test_unexpected_errors_are_internal_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    behaviour = Behaviour()
    behaviour.raise_this = KeyError("secret-internal-detail")
    running = await _start(behaviour)
    with caplog.at_level(logging.ERROR, logger="parley.rpc"):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(cache_pb2.GetCacheStatsRequest())
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in info.value.details()
    assert len([r for r in caplog.records if r.name == "parley.rpc"]) == 1
    await running.stop(0)


async def test_stop_drains_in_flight_calls_and_refuses_new_ones() -> None:
    behaviour = Behaviour()
    running = await _start(behaviour)
    await running.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.FlushCache(cache_pb2.FlushCacheRequest()))
        await behaviour.flush_started.wait()
        await running.stop(grace=5)
        assert (await in_flight).removed == 7  # finished, not cut off
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetCacheStats(cache_pb2.GetCacheStatsRequest(), timeout=1)


def test_json_log_lines_carry_service_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("unit", "INFO")
    logging.getLogger("parley.test").info("hello", extra={"fields": {"model": "m"}})
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["service"] == "unit" and line["message"] == "hello" and line["model"] == "m" and line["level"] == "info"
    assert line["time"].endswith("Z")


async def test_a_request_that_does_not_decode_is_invalid_argument() -> None:
    """Envoy passes a path's bytes on as they came: `%ff` in a URL is invalid UTF-8 in a string field."""
    behaviour = Behaviour()
    behaviour.GetRateLimit = lambda request, context: cache_pb2.RateLimit()  # type: ignore[method-assign]
    running = await _start(behaviour)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        raw = channel.unary_unary(f"/{NAME}/GetRateLimit")  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\x0a\x02\xff\xfe")  # field 1 (user_id): the bytes ff fe
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "UTF-8" in info.value.details() and "DecodeError" not in info.value.details()
    await running.stop(0)
