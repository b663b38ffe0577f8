"""Wires the session service: settings, store, the inference client, servicer, identity, and the
WebSocket bridge beside the gRPC server (services/session/websocket.py)."""

from __future__ import annotations

import asyncio
import logging

from parley.inference.v1 import inference_pb2_grpc
from parley.session.v1 import session_pb2, session_pb2_grpc

from services.auth import client as auth_client
from services.core import channels, config, database
from services.core.config import CommonSettings, DatabaseSettings
from services.core.server import Registration, ServiceSpec
from services.session.service import SessionService
from services.session.servicer import SessionServicer
from services.session.settings import SessionSettings
from services.session.websocket import WebSocketBridge
from services.session.store import SqlSessionStore

log = logging.getLogger("parley.session")


async def build(common: CommonSettings, settings: SessionSettings | None = None,
                database_settings: DatabaseSettings | None = None) -> ServiceSpec:
    settings = settings or config.load(SessionSettings)
    database_settings = database_settings or config.load(DatabaseSettings)
    log.info("settings", extra={"fields": {**config.describe(settings), **config.describe(database_settings)}})
    store = await asyncio.to_thread(SqlSessionStore, database.location(common.data_dir, database_settings, "session"))
    inference_channel = channels.open_channel(common, "inference")
    service = SessionService(store, settings, inference_pb2_grpc.InferenceServiceStub(inference_channel))

    # Started once the gRPC server it bridges to is up; closed as shutdown starts (sockets get 1001),
    # so that its calls end before the server's drain.
    bridge = WebSocketBridge(common, settings) if common.session_websocket_port else None

    async def ready() -> None:
        if bridge is not None:
            await bridge.start()

    async def stopping() -> None:
        if bridge is not None:
            await bridge.close()

    async def close() -> None:
        await inference_channel.close()
        store.close()

    name = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
    return ServiceSpec(
        name="session",
        registrations=[Registration(name, session_pb2_grpc.add_SessionServiceServicer_to_server, SessionServicer(service))],
        ready=ready,
        close=close,
        stopping=stopping,
        interceptors=[auth_client.interceptor(common)],
    )
