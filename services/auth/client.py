"""The auth service's client, for every other service: the identity interceptor wired to verify
credentials through auth (its JWKS for access tokens, CredentialService.VerifyApiKey for API keys),
and the mapping between role names and the contract's Role values."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

import grpc
from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.core import channels, config
from services.core.errors import Unauthenticated
from services.core.identity import (
    ROLE_ADMIN, ROLE_USER, CredentialVerifier, Identity, IdentityInterceptor, IdentitySettings, forward_credentials,
)

# Role names as they appear in tokens and in the store, and as proto enum values.
ROLE_TO_PROTO = {ROLE_USER: auth_pb2.ROLE_USER, ROLE_ADMIN: auth_pb2.ROLE_ADMIN}
PROTO_TO_ROLE = {v: k for k, v in ROLE_TO_PROTO.items()}


def remote_verifier(common: config.CommonSettings, settings: IdentitySettings | None = None,
                    channel: grpc.aio.Channel | None = None) -> CredentialVerifier:
    """A verifier that asks the auth service (at common.auth_target) for keys and API keys."""
    channel = channel or channels.open_channel(common, "auth")
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    credentials = auth_pb2_grpc.CredentialServiceStub(channel)

    async def fetch_jwks() -> Sequence[Mapping[str, str]]:
        response = await auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        return [{"kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid, "alg": k.alg, "use": k.use}
                for k in response.keys]

    async def verify_api_key(secret: str) -> Identity:
        try:
            r = await credentials.VerifyApiKey(auth_pb2.VerifyApiKeyRequest(secret=secret), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                raise Unauthenticated(exc.details() or "invalid API key") from None
            raise
        return Identity(r.user_id, r.username, frozenset(PROTO_TO_ROLE[x] for x in r.roles if x in PROTO_TO_ROLE),
                        r.api_key_id or None, api_key_weight=r.api_key_weight or 1.0)

    return CredentialVerifier(fetch_jwks, verify_api_key, settings or config.load(IdentitySettings))


def interceptor(common: config.CommonSettings, roles: Mapping[str, Collection[str]] | None = None,
                settings: IdentitySettings | None = None) -> IdentityInterceptor:
    """The identity interceptor for a service other than auth. Call it inside the service's async
    build() (it opens a gRPC channel)."""
    return IdentityInterceptor(remote_verifier(common, settings), roles=roles)


def user_exists(common: config.CommonSettings, channel: grpc.aio.Channel | None = None) -> Callable[[str], Awaitable[bool]]:
    """Whether a user id names an account, asked of auth (GetUser) with the current caller's own
    credentials: auth answers admins only, so this adds nothing a caller could not ask itself."""
    auth = auth_pb2_grpc.AuthServiceStub(channel or channels.open_channel(common, "auth"))

    async def exists(user_id: str) -> bool:
        try:
            await auth.GetUser(auth_pb2.GetUserRequest(id=user_id), metadata=forward_credentials(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    return exists
