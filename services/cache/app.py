"""Wires the cache service's servicers into a ServiceSpec."""

from __future__ import annotations

from parley.cache.v1 import cache_pb2, cache_pb2_grpc

from services.core import identity
from services.core.config import CommonSettings
from services.core.server import Registration, ServiceSpec


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Behaviour arrives with the cache issue; until then every RPC answers UNIMPLEMENTED."""


async def build(common: CommonSettings) -> ServiceSpec:
    name = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
    admin_only = {f"/{name}/{method}": ("admin",) for method in ("FlushCache", "UpdateRateLimit")}
    return ServiceSpec(
        name="cache",
        registrations=[Registration(name, cache_pb2_grpc.add_CacheServiceServicer_to_server, CacheServicer())],
        interceptors=[identity.interceptor(common, roles=admin_only)],
    )
