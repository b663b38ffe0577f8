"""Wires the session service's servicers into a ServiceSpec."""

from __future__ import annotations

from parley.session.v1 import session_pb2, session_pb2_grpc

from services.core import identity
from services.core.config import CommonSettings
from services.core.server import Registration, ServiceSpec


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Behaviour arrives with the session issue; until then every RPC answers UNIMPLEMENTED."""


async def build(common: CommonSettings) -> ServiceSpec:
    name = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
    return ServiceSpec(
        name="session",
        registrations=[Registration(name, session_pb2_grpc.add_SessionServiceServicer_to_server, SessionServicer())],
        interceptors=[identity.interceptor(common)],
    )
