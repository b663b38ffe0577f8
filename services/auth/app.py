"""Wires the auth service's servicers into a ServiceSpec."""

from __future__ import annotations

from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.core.config import CommonSettings
from services.core.server import Registration, ServiceSpec


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Behaviour arrives with the auth issue; until then every RPC answers UNIMPLEMENTED."""


async def build(common: CommonSettings) -> ServiceSpec:
    name = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
    return ServiceSpec(
        name="auth",
        registrations=[Registration(name, auth_pb2_grpc.add_AuthServiceServicer_to_server, AuthServicer())],
    )
