"""Wires the auth service: settings, store, domain service, servicers and the identity interceptor."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth.service import AuthService
from services.auth.servicer import AuthServicer, CredentialServicer
from services.auth.settings import AuthSettings
from services.auth.store import AuthStore
from services.core import config, database
from services.core.config import CommonSettings, DatabaseSettings
from services.core.identity import CredentialVerifier, IdentityInterceptor, IdentitySettings
from services.core.server import Registration, ServiceSpec

log = logging.getLogger("parley.auth")


async def build(common: CommonSettings, settings: AuthSettings | None = None,
                identity_settings: IdentitySettings | None = None,
                database_settings: DatabaseSettings | None = None) -> ServiceSpec:
    settings = settings or config.load(AuthSettings)
    identity_settings = identity_settings or config.load(IdentitySettings)
    database_settings = database_settings or config.load(DatabaseSettings)
    log.info("settings", extra={"fields": {**config.describe(settings), **config.describe(identity_settings),
                                           **config.describe(database_settings)}})
    store = await asyncio.to_thread(AuthStore, database.location(common.data_dir, database_settings, "auth"))
    # Constructed in a thread too: the password hasher hashes a dummy password to start with.
    service = await asyncio.to_thread(AuthService, store, settings, identity_settings)

    async def close() -> None:
        # Closing waits for the SQLite lock or drains the PostgreSQL pool (seconds in an outage):
        # never on the event loop.
        service.close()
        await asyncio.to_thread(store.close)

    try:
        await service.start()
    except BaseException:
        await close()
        raise
    # The auth service verifies credentials in-process: same checks as every other service, but
    # keys and API keys come straight from its store, so a revoked key stops working at once.
    verifier = CredentialVerifier(service.jwks, service.verify_api_key,
                                  dataclasses.replace(identity_settings, api_key_cache_seconds=0,
                                                      jwks_refetch_seconds=0))

    descriptor = auth_pb2.DESCRIPTOR.services_by_name
    return ServiceSpec(
        name="auth",
        registrations=[
            Registration(descriptor["AuthService"].full_name, auth_pb2_grpc.add_AuthServiceServicer_to_server,
                         AuthServicer(service)),
            Registration(descriptor["CredentialService"].full_name,
                         auth_pb2_grpc.add_CredentialServiceServicer_to_server, CredentialServicer(service)),
        ],
        close=close,
        interceptors=[IdentityInterceptor(verifier)],
    )
