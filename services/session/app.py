"""Wires the session service: settings, store, the inference client, servicer, identity."""

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

    async def close() -> None:
        await inference_channel.close()
        store.close()

    name = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
    return ServiceSpec(
        name="session",
        registrations=[Registration(name, session_pb2_grpc.add_SessionServiceServicer_to_server, SessionServicer(service))],
        close=close,
        interceptors=[auth_client.interceptor(common)],
    )
