"""Wires the session service: settings, store, the inference client, servicer, identity."""

from __future__ import annotations

import logging

from parley.inference.v1 import inference_pb2_grpc
from parley.session.v1 import session_pb2, session_pb2_grpc

from services.core import channels, config, identity
from services.core.config import CommonSettings
from services.core.server import Registration, ServiceSpec
from services.session.service import SessionService
from services.session.servicer import SessionServicer
from services.session.settings import SessionSettings
from services.session.store import SqliteSessionStore

DB_NAME = "session.db"

log = logging.getLogger("parley.session")


async def build(common: CommonSettings, settings: SessionSettings | None = None) -> ServiceSpec:
    settings = settings or config.load(SessionSettings)
    log.info("settings", extra={"fields": config.describe(settings)})
    store = SqliteSessionStore(common.data_dir / DB_NAME)
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
        interceptors=[identity.interceptor(common)],
    )
