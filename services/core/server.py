"""serve(): how every Parley service runs.

A grpc.aio server with the telemetry and error-mapping interceptors, grpc.health.v1 and server
reflection; in a service process also tracing and a Prometheus endpoint (core.telemetry). Health
reports NOT_SERVING until the service's `ready` hook has finished (the inference service loads its
model there), and again as soon as shutdown starts so that load balancers stop sending traffic.
SIGTERM or SIGINT then drains in-flight calls for up to the grace period before the process exits.

Tests use `start_server()` directly: it binds port 0 and returns the running server and its port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.core import config, logs, telemetry
from services.core.interceptors import ErrorMappingInterceptor
from services.core.path_ids import PathIdInterceptor

log = logging.getLogger("parley.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS = (
    # grpc enables SO_REUSEPORT by default: a second process would silently share the port.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class Registration:
    """One gRPC service a process exposes: its full name, the generated add-function, the servicer."""

    name: str
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


@dataclass
class ServiceSpec:
    """What a service process is: its services, and hooks for readiness and shutdown."""

    name: str
    registrations: Sequence[Registration]
    ready: Callable[[], Awaitable[None]] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    # Runs as shutdown starts, before in-flight calls drain: for what feeds calls in (a WebSocket bridge).
    stopping: Callable[[], Awaitable[None]] | None = None
    interceptors: Sequence[grpc.aio.ServerInterceptor] = field(default_factory=tuple)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    spec: ServiceSpec

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *(r.name for r in self.spec.registrations)):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.set_serving(False)
        if self.spec.stopping is not None:
            await self.spec.stopping()
        await self.server.stop(grace)
        if self.spec.close is not None:
            await self.spec.close()


async def start_server(spec: ServiceSpec, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Starts the server (NOT_SERVING) and returns it with its bound port."""
    server = grpc.aio.server(
        # Telemetry outermost, so that it sees every call (also those identity refuses) with its final
        # status; error mapping innermost, so that the others see statuses, not exceptions.
        # The URL's id is checked against the body's before any servicer reads either.
        interceptors=[telemetry.ServerTelemetry(), *spec.interceptors, PathIdInterceptor(), ErrorMappingInterceptor()],
        options=SERVER_OPTIONS,
    )
    for registration in spec.registrations:
        registration.add(registration.servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*(r.name for r in spec.registrations), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"{spec.name}: cannot listen on {host}:{port} (in use?)")
    await server.start()
    running = RunningServer(server=server, port=bound, health=health, spec=spec)
    await running.set_serving(False)
    return running


async def serve(spec: ServiceSpec, common: config.CommonSettings) -> None:
    """Runs a service until SIGTERM/SIGINT, then drains and exits."""
    stop_telemetry = telemetry.start(spec.name, common.host, config.load(telemetry.TelemetrySettings))
    try:
        await _serve(spec, common)
    finally:
        stop_telemetry()


async def _serve(spec: ServiceSpec, common: config.CommonSettings) -> None:
    running = await start_server(spec, common.host, common.port_of(spec.name))
    log.info("listening", extra={"fields": {"address": f"{common.host}:{running.port}"}})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def become_ready() -> None:
        if spec.ready is not None:
            await spec.ready()
        await running.set_serving(True)
        log.info("serving")

    ready_task = asyncio.create_task(become_ready())
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({ready_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready_task in done and ready_task.exception() is not None:
        stopped.cancel()
        await running.stop(0)
        raise ready_task.exception()  # type: ignore[misc]
    await stopped
    ready_task.cancel()
    log.info("shutting down", extra={"fields": {"grace_seconds": common.shutdown_grace_seconds}})
    await running.stop(common.shutdown_grace_seconds)
    log.info("stopped")


def run(name: str, build: Callable[[config.CommonSettings], Awaitable[ServiceSpec]]) -> None:
    """A service's main(): load config, log as JSON, serve. Exit 2 with a clear message on bad config."""
    try:
        common = config.load(config.CommonSettings)
    except config.ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(name, common.log_level)

    async def main() -> None:
        spec = await build(common)
        await serve(spec, common)

    try:
        asyncio.run(main())
    except config.ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
