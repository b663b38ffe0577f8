"""Who is calling: one server interceptor that every service uses to authenticate requests.

A caller sends `authorization: Bearer <credential>` (Envoy passes the HTTP header through as gRPC
metadata). The credential is either
- a JWT access token signed by the auth service (EdDSA): verified here, locally, against the auth
  service's JWKS, which is cached and refetched when a token names a key id not seen yet (at most
  once every few seconds, so garbage tokens cannot hammer the auth service), or
- an API key (`pk-...`): verified by the auth service's internal CredentialService.VerifyApiKey and
  cached for a short time.

Handlers read the caller with `current_identity()`; to call another service on the caller's behalf
they attach `forward_credentials()` as metadata. Role checks raise PERMISSION_DENIED.

Wiring a service (other than auth), inside its async build(common), with the auth service's client
(services.auth.client), which verifies through the auth service:

    ServiceSpec(..., interceptors=[auth_client.interceptor(common, roles={"/pkg.Svc/AdminOnly": ("admin",)})])
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.core.config import setting
from services.core.errors import ParleyError, PermissionDenied, Unauthenticated, Unavailable
from services.core.interceptors import WrappingInterceptor, abort_with

log = logging.getLogger("parley.identity")

API_KEY_PREFIX = "pk-"
ALGORITHM = "EdDSA"

# Role names as they appear in tokens and in the store (services.auth.client maps them to the proto's).
ROLE_USER = "user"
ROLE_ADMIN = "admin"

# The largest fair-share weight of a user (services.cache.ratelimit) or of an API key (services.auth).
MAX_SHARE_WEIGHT = 1000.0

# Methods anyone may call. VerifyApiKey is internal: the gateway does not route it.
PUBLIC_METHODS: frozenset[str] = frozenset({
    "/parley.auth.v1.AuthService/Register",
    "/parley.auth.v1.AuthService/Login",
    "/parley.auth.v1.AuthService/Refresh",
    "/parley.auth.v1.AuthService/GetJwks",
    "/parley.auth.v1.CredentialService/VerifyApiKey",
})
PUBLIC_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


RETRY_AFTER_SECONDS = 2  # what a caller is told to wait when the auth service cannot answer

@dataclasses.dataclass(frozen=True)
class IdentitySettings:
    """What every service needs to verify credentials (PARLEY_* variables, shared by all services)."""

    jwt_issuer: str = setting("parley", help="`iss` of access tokens")
    jwt_audience: str = setting("parley", help="`aud` of access tokens")
    api_key_cache_seconds: float = setting(30.0, min=0, help="how long a verified API key is trusted")
    jwks_refetch_seconds: float = setting(5.0, min=0, help="least time between JWKS fetches for unknown key ids")
    jwks_max_age_seconds: float = setting(300.0, min=1, help="how long a fetched JWKS is used before a refetch")
    clock_leeway_seconds: int = setting(5, min=0, max=300)


@dataclasses.dataclass(frozen=True)
class Identity:
    """The authenticated caller. `credential` is what the caller presented, kept only to forward it
    to other services: it never appears in repr() and so never in logs. `api_key_weight` is the API
    key's share weight within its user's fair share (services.inference.engines.fair); like the rest
    of a key's identity it is cached for api_key_cache_seconds, so a changed weight takes effect
    within that time."""

    user_id: str
    username: str
    roles: frozenset[str]
    api_key_id: str | None = None
    credential: str = dataclasses.field(default="", repr=False, compare=False)
    api_key_weight: float = 1.0

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def require_role(self, role: str) -> None:
        if role not in self.roles:
            raise PermissionDenied(f"this needs the {role} role")


_current: ContextVar[Identity | None] = ContextVar("parley_identity", default=None)
_verifier: ContextVar[CredentialVerifier | None] = ContextVar("parley_verifier", default=None)


def current_identity() -> Identity:
    """The caller of the RPC being handled; UNAUTHENTICATED inside a public method."""
    identity = _current.get()
    if identity is None:
        raise Unauthenticated("this needs a signed-in caller")
    return identity


def optional_identity() -> Identity | None:
    return _current.get()


async def reauthenticate() -> Identity:
    """The caller's credential checked again, by the verifier that admitted the call: for a call that
    outlives it (a WebSocket conversation), an access token that has expired since the call began,
    or an API key revoked since (within PARLEY_API_KEY_CACHE_SECONDS), is UNAUTHENTICATED now."""
    identity = current_identity()
    verifier = _verifier.get()
    if verifier is None:
        return identity
    again = await verifier.authenticate(identity.credential)
    if again.user_id != identity.user_id:
        raise Unauthenticated("the credential no longer names the caller of this call")
    return again


# Anthropic's SDKs and Claude Code send the key in this header instead of authorization.
API_KEY_HEADER = "x-api-key"


def forward_credentials(identity: Identity | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for an outgoing call made on the caller's behalf: `stub.Method(req, metadata=...)`."""
    identity = identity or _current.get()
    if identity is None or not identity.credential:
        return ()
    return (("authorization", f"Bearer {identity.credential}"),)


def bearer_credential(metadata: Sequence[Any] | None) -> str:
    """The credential from `authorization: Bearer <credential>` or, as Anthropic's clients send it,
    `x-api-key: <credential>` (authorization wins when both come); else UNAUTHENTICATED."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        keys = [value for key, value in (metadata or ()) if key == API_KEY_HEADER]
        if len(keys) == 1 and isinstance(keys[0], str) and keys[0].strip() and not any(
                c.isspace() for c in keys[0].strip()):
            return keys[0].strip()
        if keys:
            raise Unauthenticated(f"malformed {API_KEY_HEADER} header: send exactly one credential")
        raise Unauthenticated("missing credentials: send 'Authorization: Bearer <token or API key>' "
                              f"(or '{API_KEY_HEADER}: <API key>')")
    if len(values) > 1 or not isinstance(values[0], str):
        raise Unauthenticated("malformed authorization header: send exactly one 'Bearer <credential>'")
    scheme, _, credential = values[0].strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or any(c.isspace() for c in credential):
        raise Unauthenticated("malformed authorization header: expected 'Bearer <credential>'")
    return credential


def _public_key(jwk: Mapping[str, str]) -> Ed25519PublicKey | None:
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or jwk.get("alg", ALGORITHM) != ALGORITHM:
        return None
    try:
        x = jwk["x"]
        return Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))
    except (KeyError, ValueError):
        return None


JwksFetch = Callable[[], Awaitable[Sequence[Mapping[str, str]]]]
ApiKeyCheck = Callable[[str], Awaitable[Identity]]


class CredentialVerifier:
    """Turns a bearer credential into an Identity, or raises Unauthenticated."""

    def __init__(self, fetch_jwks: JwksFetch, verify_api_key: ApiKeyCheck, settings: IdentitySettings) -> None:
        self._fetch_jwks = fetch_jwks
        self._verify_api_key = verify_api_key
        self._settings = settings
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None
        self._jwks_lock = asyncio.Lock()
        self._api_keys: dict[str, tuple[Identity, float]] = {}

    async def authenticate(self, credential: str) -> Identity:
        if credential.startswith(API_KEY_PREFIX):
            identity = await self._api_key(credential)
        else:
            identity = await self._jwt(credential)
        return dataclasses.replace(identity, credential=credential)

    async def _api_key(self, secret: str) -> Identity:
        ttl = self._settings.api_key_cache_seconds
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        cached = self._api_keys.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            identity = await self._verify_api_key(secret)
        except ParleyError:
            raise
        except grpc.aio.AioRpcError as exc:
            log.warning("API key verification failed", extra={"fields": {"code": exc.code().name}})
            raise Unavailable("the authentication service is unavailable; try again",
                              retry_after=RETRY_AFTER_SECONDS) from None
        if ttl > 0:
            if len(self._api_keys) > 10_000:
                self._api_keys = {k: v for k, v in self._api_keys.items() if v[1] > now}
            self._api_keys[digest] = (identity, now + ttl)
        return identity

    async def _public_key_for(self, kid: str) -> Ed25519PublicKey | None:
        s = self._settings
        now = time.monotonic()
        stale = self._fetched_at is None or now - self._fetched_at > s.jwks_max_age_seconds
        unknown = kid not in self._keys
        may_refetch = self._fetched_at is None or now - self._fetched_at >= s.jwks_refetch_seconds
        if stale or (unknown and may_refetch):
            async with self._jwks_lock:
                # Another request may have refreshed the keys while this one waited.
                if self._fetched_at is None or (time.monotonic() - self._fetched_at >= s.jwks_refetch_seconds
                                                and (stale or kid not in self._keys)):
                    await self._refresh_keys()
        return self._keys.get(kid)

    async def _refresh_keys(self) -> None:
        try:
            jwks = await self._fetch_jwks()
        except (grpc.aio.AioRpcError, ParleyError) as exc:
            log.warning("cannot fetch the JWKS", extra={"fields": {"error": type(exc).__name__}})
            if not self._keys:
                raise Unavailable("the authentication service is unavailable; try again",
                                  retry_after=RETRY_AFTER_SECONDS) from None
            return
        keys = {}
        for jwk in jwks:
            key = _public_key(jwk)
            if key is not None and jwk.get("kid"):
                keys[jwk["kid"]] = key
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def _jwt(self, token: str) -> Identity:
        s = self._settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed access token") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("access token uses an algorithm this server does not accept")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("access token names no signing key")
        key = await self._public_key_for(kid)
        if key is None:
            raise Unauthenticated("access token is signed by an unknown key")
        try:
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=s.jwt_audience, issuer=s.jwt_issuer,
                leeway=s.clock_leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("access token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("access token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("access token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("access token comes from another issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("access token signature is invalid") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid access token") from None
        roles = claims.get("roles", [])
        username = claims.get("preferred_username", "")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles) or not isinstance(username, str):
            raise Unauthenticated("invalid access token")
        return Identity(str(claims["sub"]), username, frozenset(roles))


class IdentityInterceptor(WrappingInterceptor):
    """Authenticates every call except the public ones and checks per-method roles.

    It runs before core.interceptors.ErrorMappingInterceptor (server.start_server puts a spec's
    interceptors first), so it aborts rejected calls itself through the same abort_with.
    """

    def __init__(self, verifier: CredentialVerifier, roles: Mapping[str, Collection[str]] | None = None,
                 public: Collection[str] = PUBLIC_METHODS) -> None:
        self._verifier = verifier
        self._roles = dict(roles or {})
        self._public = frozenset(public)

    def is_public(self, method: str) -> bool:
        return method in self._public or method.startswith(PUBLIC_PREFIXES)

    passes_through = is_public

    async def _identify(self, context: grpc.aio.ServicerContext, method: str) -> Identity:
        identity = await self._verifier.authenticate(bearer_credential(context.invocation_metadata()))
        for role in self._roles.get(method, ()):
            identity.require_role(role)
        return identity

    def wrap_unary(self, behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                identity = await self._identify(context, method)
            except Exception as exc:  # noqa: BLE001 - mapped to a status right here
                await abort_with(context, exc, method)
            token, checker = _current.set(identity), _verifier.set(self._verifier)
            try:
                return await behavior(request, context)
            finally:
                _verifier.reset(checker)
                _current.reset(token)

        return handler

    def wrap_stream(self, behavior: Callable[..., AsyncIterator[Any]],
                     method: str) -> Callable[..., AsyncIterator[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                identity = await self._identify(context, method)
            except Exception as exc:  # noqa: BLE001 - mapped to a status right here
                await abort_with(context, exc, method)
            token, checker = _current.set(identity), _verifier.set(self._verifier)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                # A generator closed from elsewhere runs this in another context; grpc.aio gives
                # each RPC its own task, so the value ends with the call either way.
                with contextlib.suppress(ValueError):
                    _verifier.reset(checker)
                    _current.reset(token)

        return handler
