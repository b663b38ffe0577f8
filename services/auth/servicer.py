"""gRPC servicers for the auth service: proto <-> domain, nothing else."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth.service import AuthService, TokenPair
from services.auth.store import ApiKeyRecord, UserRecord
from services.auth.client import ROLE_TO_PROTO
from services.core.identity import current_identity


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def user_proto(user: UserRecord) -> auth_pb2.User:
    return auth_pb2.User(id=user.id, username=user.username, roles=[ROLE_TO_PROTO[r] for r in user.roles],
                         create_time=_timestamp(user.created_at))


def tokens_proto(pair: TokenPair) -> auth_pb2.TokenPair:
    return auth_pb2.TokenPair(access_token=pair.access_token, token_type="Bearer", expires_in=pair.expires_in,
                              refresh_token=pair.refresh_token)


def api_key_proto(key: ApiKeyRecord) -> auth_pb2.ApiKey:
    message = auth_pb2.ApiKey(id=key.id, name=key.name, prefix=key.prefix, create_time=_timestamp(key.created_at),
                              share_weight=key.share_weight)
    if key.expires_at is not None:
        message.expire_time.CopyFrom(_timestamp(key.expires_at))
    if key.last_used_at is not None:
        message.last_used_time.CopyFrom(_timestamp(key.last_used_at))
    return message


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address: the last X-Forwarded-For hop (added by the gateway), else the peer's IP."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-forwarded-for" and isinstance(value, str):
            hops = [hop.strip() for hop in value.split(",") if hop.strip()]
            if hops:
                return hops[-1]
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, service: AuthService) -> None:
        self._service = service

    async def Register(self, request: auth_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> auth_pb2.RegisterResponse:
        user, tokens = await self._service.register(request.username, request.password)
        return auth_pb2.RegisterResponse(user=user_proto(user), tokens=tokens_proto(tokens))

    async def Login(self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext) -> auth_pb2.LoginResponse:
        user, tokens = await self._service.login(request.username, request.password, client_address(context))
        return auth_pb2.LoginResponse(user=user_proto(user), tokens=tokens_proto(tokens))

    async def Refresh(self, request: auth_pb2.RefreshRequest,
                      context: grpc.aio.ServicerContext) -> auth_pb2.RefreshResponse:
        return auth_pb2.RefreshResponse(tokens=tokens_proto(await self._service.refresh(request.refresh_token)))

    async def Logout(self, request: auth_pb2.LogoutRequest,
                     context: grpc.aio.ServicerContext) -> auth_pb2.LogoutResponse:
        await self._service.logout(current_identity(), request.refresh_token)
        return auth_pb2.LogoutResponse()

    async def GetJwks(self, request: auth_pb2.GetJwksRequest,
                      context: grpc.aio.ServicerContext) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.Jwk(**jwk) for jwk in await self._service.jwks()])

    async def RotateSigningKey(self, request: auth_pb2.RotateSigningKeyRequest,
                               context: grpc.aio.ServicerContext) -> auth_pb2.RotateSigningKeyResponse:
        return auth_pb2.RotateSigningKeyResponse(kid=await self._service.rotate_signing_key(current_identity()))

    async def GetCurrentUser(self, request: auth_pb2.GetCurrentUserRequest,
                             context: grpc.aio.ServicerContext) -> auth_pb2.User:
        return user_proto(await self._service.current_user(current_identity()))

    async def GetUser(self, request: auth_pb2.GetUserRequest, context: grpc.aio.ServicerContext) -> auth_pb2.User:
        return user_proto(await self._service.user_by_id(current_identity(), request.id))

    async def CreateApiKey(self, request: auth_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.CreateApiKeyResponse:
        weight = request.share_weight if request.HasField("share_weight") else 1.0
        created = await self._service.create_api_key(current_identity(), request.name, request.ttl_seconds, weight)
        return auth_pb2.CreateApiKeyResponse(api_key=api_key_proto(created.key), secret=created.secret)

    async def ListApiKeys(self, request: auth_pb2.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> auth_pb2.ListApiKeysResponse:
        keys, next_token = await self._service.list_api_keys(current_identity(), request.page_size, request.page_token)
        return auth_pb2.ListApiKeysResponse(api_keys=[api_key_proto(k) for k in keys], next_page_token=next_token)

    async def UpdateApiKey(self, request: auth_pb2.UpdateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.ApiKey:
        key = request.api_key
        weight = key.share_weight if key.HasField("share_weight") else None
        return api_key_proto(await self._service.update_api_key(current_identity(), key.id, key.name or None, weight))

    async def DeleteApiKey(self, request: auth_pb2.DeleteApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.DeleteApiKeyResponse:
        await self._service.delete_api_key(current_identity(), request.id)
        return auth_pb2.DeleteApiKeyResponse()


class CredentialServicer(auth_pb2_grpc.CredentialServiceServicer):
    """Internal: other services' IdentityInterceptor verifies API keys here."""

    def __init__(self, service: AuthService) -> None:
        self._service = service

    async def VerifyApiKey(self, request: auth_pb2.VerifyApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.VerifyApiKeyResponse:
        identity = await self._service.verify_api_key(request.secret)
        return auth_pb2.VerifyApiKeyResponse(
            user_id=identity.user_id, username=identity.username, api_key_id=identity.api_key_id or "",
            api_key_weight=identity.api_key_weight,
            roles=[ROLE_TO_PROTO[r] for r in sorted(identity.roles) if r in ROLE_TO_PROTO])
