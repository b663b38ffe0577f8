"""AuthService: accounts, sign-in, token rotation, API keys and signing keys — no gRPC in here.

Blocking work runs off the event loop: store calls (SQLite or PostgreSQL) in asyncio's default
threads, argon2 in a pool of its own with one thread per core, so that a burst of sign-ins neither
queues the database calls behind dozens of hashes nor starts more hashes than there are cores to
run them. Nothing here logs a password, token, secret or hash; log lines name users by id.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from services.auth import passwords
from services.auth.passwords import PasswordHasher
from services.auth.settings import AuthSettings
from services.auth.store import ApiKeyRecord, AuthStore, RefreshRecord, UserRecord
from services.auth.throttle import LoginThrottle
from services.auth.tokens import TokenIssuer
from services.core.config import ConfigError
from services.core.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                                  Unauthenticated)
from services.core.identity import API_KEY_PREFIX, MAX_SHARE_WEIGHT, ROLE_ADMIN, ROLE_USER, Identity, IdentitySettings

log = logging.getLogger("parley.auth")

ADMIN_USERNAME = "admin"
ROLES = (ROLE_USER, ROLE_ADMIN)
MAX_API_KEYS_PER_USER = 100
MAX_API_KEY_TTL_SECONDS = 5 * 365 * 86400
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
LAST_USED_GRANULARITY_SECONDS = 60.0  # an API key's last-used time is written at most this often


T = TypeVar("T")


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _successor(refresh_token: str, salt: str) -> str:
    """The refresh token that follows `refresh_token`: whoever presents the old token while the
    store holds `salt` can derive it again (a concurrent refresh), and nobody else — the store keeps
    neither token, only their hashes."""
    digest = hmac.new(bytes.fromhex(salt), refresh_token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str


@dataclass(frozen=True)
class NewApiKey:
    key: ApiKeyRecord
    secret: str  # shown once


class AuthService:
    def __init__(self, store: AuthStore, settings: AuthSettings, identity: IdentitySettings) -> None:
        self.store = store
        self.settings = settings
        self.hasher = PasswordHasher(settings.argon2_time_cost, settings.argon2_memory_kib,
                                     settings.argon2_parallelism)
        self.tokens = TokenIssuer(store, identity.jwt_issuer, identity.jwt_audience,
                                  settings.access_token_ttl_seconds, settings.signing_keys_dir)
        self.throttle = LoginThrottle(settings, store)
        self._hashing = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="argon2")

    def close(self) -> None:
        self._hashing.shutdown(wait=False, cancel_futures=True)

    async def _hash(self, work: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._hashing, work, *args)

    async def start(self) -> None:
        """Loads (or creates) the signing keys and creates the admin user if asked to."""
        await asyncio.to_thread(self.tokens.load)
        source = str(self.tokens.keys_dir) if self.tokens.keys_dir is not None else "store"
        log.info("signing keys loaded", extra={"fields": {"source": source, "signing_kid": self.tokens.signing_kid}})
        if self.settings.admin_password:
            try:
                created = await self.create_admin_if_missing(self.settings.admin_password)
            except InvalidArgument as exc:
                raise ConfigError(f"PARLEY_ADMIN_PASSWORD is not acceptable: {exc.message}") from None
            if created:
                log.info("created the admin user", extra={"fields": {"username": ADMIN_USERNAME}})

    # Accounts

    async def create_user(self, username: str, password: str, roles: tuple[str, ...] = (ROLE_USER,)) -> UserRecord:
        passwords.check_username(username)
        passwords.check_strength(password, username)
        for role in roles:
            if role not in ROLES:
                raise InvalidArgument(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        if await asyncio.to_thread(self.store.user_by_key, passwords.username_key(username)) is not None:
            raise AlreadyExists("that username is taken")
        password_hash = await self._hash(self.hasher.hash, password)
        user = await asyncio.to_thread(self.store.create_user, username, passwords.username_key(username),
                                       password_hash, roles)
        log.info("user created", extra={"fields": {"user_id": user.id, "roles": list(roles)}})
        return user

    async def create_admin_if_missing(self, password: str) -> bool:
        if await asyncio.to_thread(self.store.user_by_key, ADMIN_USERNAME) is not None:
            return False
        try:
            await self.create_user(ADMIN_USERNAME, password, (ROLE_USER, ROLE_ADMIN))
        except AlreadyExists:  # another replica starting at the same time made it
            return False
        return True

    async def register(self, username: str, password: str) -> tuple[UserRecord, TokenPair]:
        if not self.settings.allow_registration:
            raise PermissionDenied("registration is closed on this server; ask an administrator for an account")
        user = await self.create_user(username, password)
        return user, await self._new_session(user)

    async def user_by_name(self, username: str) -> UserRecord:
        user = await asyncio.to_thread(self.store.user_by_key, passwords.username_key(username))
        if user is None:
            raise NotFound(f"no user named {username!r}")
        return user

    async def set_roles(self, username: str, roles: tuple[str, ...]) -> UserRecord:
        for role in roles:
            if role not in ROLES:
                raise InvalidArgument(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        # Every account is a user; admin is added on top.
        wanted = tuple(r for r in ROLES if r == ROLE_USER or r in roles)
        user = await self.user_by_name(username)
        await asyncio.to_thread(self.store.set_roles, user.id, wanted)
        log.info("roles set", extra={"fields": {"user_id": user.id, "roles": list(wanted)}})
        return await self.user_by_name(username)

    async def reset_password(self, username: str, password: str) -> None:
        """Sets a new password and signs the user out everywhere (refresh tokens are revoked)."""
        user = await self.user_by_name(username)
        passwords.check_strength(password, user.username)
        password_hash = await self._hash(self.hasher.hash, password)
        await asyncio.to_thread(self.store.set_password_hash, user.id, password_hash)
        await asyncio.to_thread(self.store.revoke_user_refresh_tokens, user.id)
        log.info("password reset", extra={"fields": {"user_id": user.id}})

    async def current_user(self, identity: Identity) -> UserRecord:
        user = await asyncio.to_thread(self.store.user_by_id, identity.user_id)
        if user is None:
            raise Unauthenticated("this account no longer exists")
        return user

    async def user_by_id(self, identity: Identity, user_id: str) -> UserRecord:
        """One user by id, for admins (GetUser)."""
        identity.require_role(ROLE_ADMIN)
        user = await asyncio.to_thread(self.store.user_by_id, user_id) if user_id else None
        if user is None:
            raise NotFound(f"no user with id {user_id!r}")
        return user

    # Sign-in and tokens

    async def login(self, username: str, password: str, address: str) -> tuple[UserRecord, TokenPair]:
        key = passwords.username_key(username.strip())
        attempt = await asyncio.to_thread(self.throttle.attempt, key, address)  # counted before the check
        if attempt.delay:
            await asyncio.sleep(attempt.delay)
        user = await asyncio.to_thread(self.store.user_by_key, key) if len(key) <= 64 else None
        # An unknown user costs the same argon2 verification as a known one with a wrong password.
        candidate = password if len(password) <= passwords.MAX_LENGTH else ""
        ok = await self._hash(self.hasher.verify, user.password_hash if user else None, candidate)
        if not ok or user is None:
            await asyncio.to_thread(self.throttle.failed, attempt)
            log.info("login failed", extra={"fields": {"client": address}})
            raise Unauthenticated("wrong username or password")
        await asyncio.to_thread(self.throttle.succeeded, attempt)
        if self.hasher.needs_rehash(user.password_hash):
            # The cost settings changed: upgrade the stored hash while the password is at hand.
            new_hash = await self._hash(self.hasher.hash, password)
            await asyncio.to_thread(self.store.set_password_hash, user.id, new_hash)
        log.info("login", extra={"fields": {"user_id": user.id}})
        return user, await self._new_session(user)

    async def _new_session(self, user: UserRecord, family_id: str | None = None) -> TokenPair:
        refresh = secrets.token_urlsafe(32)
        expires_at = time.time() + self.settings.refresh_token_ttl_seconds
        await asyncio.to_thread(self.store.add_refresh_token, _sha256(refresh), family_id or secrets.token_hex(16),
                                user.id, expires_at)
        return await self._pair(user, refresh)

    async def refresh(self, refresh_token: str) -> TokenPair:
        token_hash = _sha256(refresh_token)
        record = await asyncio.to_thread(self.store.refresh_token, token_hash) if refresh_token else None
        if record is None:
            raise Unauthenticated("invalid refresh token")
        if record.used_at is None and record.revoked_at is None:
            if record.expires_at <= time.time():
                raise Unauthenticated("refresh token has expired; sign in again")
            user = await asyncio.to_thread(self.store.user_by_id, record.user_id)
            if user is None:
                raise Unauthenticated("invalid refresh token")
            salt = secrets.token_hex(32)
            new_token = _successor(refresh_token, salt)
            expires_at = time.time() + self.settings.refresh_token_ttl_seconds
            if await asyncio.to_thread(self.store.rotate_refresh_token, record.id, _sha256(new_token),
                                       record.family_id, user.id, expires_at, salt):
                return await self._pair(user, new_token)
            # A concurrent refresh with the same token (another tab, another replica) won.
            record = await asyncio.to_thread(self.store.refresh_token, token_hash)
            if record is None:
                raise Unauthenticated("invalid refresh token")
        return await self._refresh_again(refresh_token, record)

    async def _refresh_again(self, refresh_token: str, record: RefreshRecord) -> TokenPair:
        """A used or revoked token came back. Within the grace window after its use, while its
        successor is still unused, this is a concurrent refresh (two tabs): it gets the same
        successor. Otherwise it is re-use."""
        grace = self.settings.refresh_reuse_grace_seconds
        if (record.revoked_at is None and record.used_at is not None and record.successor_salt
                and time.time() - record.used_at <= grace):
            successor = _successor(refresh_token, record.successor_salt)
            following = await asyncio.to_thread(self.store.refresh_token, _sha256(successor))
            if (following is not None and following.family_id == record.family_id and following.used_at is None
                    and following.revoked_at is None and following.expires_at > time.time()):
                user = await asyncio.to_thread(self.store.user_by_id, record.user_id)
                if user is not None:
                    return await self._pair(user, successor)
        raise await self._reuse(record)

    async def _pair(self, user: UserRecord, refresh_token: str) -> TokenPair:
        access = await asyncio.to_thread(self.tokens.issue, user.id, user.username, user.roles)
        return TokenPair(access.token, access.expires_in, refresh_token)

    async def _reuse(self, record: RefreshRecord) -> Unauthenticated:
        """Ends the whole session of a re-used token (it may have been stolen); the error to raise."""
        await asyncio.to_thread(self.store.revoke_family, record.family_id)
        log.warning("refresh token re-used; its session is revoked", extra={"fields": {"user_id": record.user_id}})
        return Unauthenticated("refresh token is no longer valid; sign in again")

    async def logout(self, identity: Identity, refresh_token: str) -> None:
        record = await asyncio.to_thread(self.store.refresh_token, _sha256(refresh_token)) if refresh_token else None
        if record is None or record.user_id != identity.user_id:
            raise NotFound("no such refresh token for this account")
        await asyncio.to_thread(self.store.revoke_family, record.family_id)
        log.info("logout", extra={"fields": {"user_id": identity.user_id}})

    # Signing keys

    async def jwks(self) -> list[dict[str, str]]:
        return await asyncio.to_thread(self.tokens.jwks)

    async def rotate_signing_key(self, identity: Identity) -> str:
        identity.require_role(ROLE_ADMIN)
        kid = await asyncio.to_thread(self.tokens.rotate)
        log.info("signing key rotated", extra={"fields": {"kid": kid, "user_id": identity.user_id}})
        return kid

    # API keys

    async def create_api_key(self, identity: Identity, name: str, ttl_seconds: int,
                             share_weight: float = 1.0) -> NewApiKey:
        name = _api_key_name(name)
        _check_share_weight(share_weight)
        if not 0 <= ttl_seconds <= MAX_API_KEY_TTL_SECONDS:
            raise InvalidArgument(f"ttl_seconds must be between 0 (no expiry) and {MAX_API_KEY_TTL_SECONDS}")
        if await asyncio.to_thread(self.store.count_api_keys, identity.user_id) >= MAX_API_KEYS_PER_USER:
            raise FailedPrecondition(f"an account can hold at most {MAX_API_KEYS_PER_USER} API keys; revoke some")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        expires_at = time.time() + ttl_seconds if ttl_seconds else None
        key = await asyncio.to_thread(self.store.add_api_key, identity.user_id, name, secret[:10], _sha256(secret),
                                      expires_at, share_weight)
        log.info("API key created", extra={"fields": {"user_id": identity.user_id, "api_key_id": key.id}})
        return NewApiKey(key, secret)

    async def list_api_keys(self, identity: Identity, page_size: int,
                            page_token: str) -> tuple[list[ApiKeyRecord], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token) if page_token else None
        keys = await asyncio.to_thread(self.store.list_api_keys, identity.user_id, after, size + 1)
        next_token = _encode_page_token(keys[size - 1]) if len(keys) > size else ""
        return keys[:size], next_token

    async def update_api_key(self, identity: Identity, key_id: str, name: str | None,
                             share_weight: float | None) -> ApiKeyRecord:
        """Renames one of the caller's keys or changes its share weight (None: left as it is). The
        weight splits only the caller's own fair share among their keys, so no admin right is
        needed; engines see a new weight once other services' cached verification of the key ends
        (PARLEY_API_KEY_CACHE_SECONDS)."""
        if name is not None:
            name = _api_key_name(name)
        if share_weight is not None:
            _check_share_weight(share_weight)
        key = await asyncio.to_thread(self.store.update_api_key, identity.user_id, key_id, name, share_weight)
        if key is None:
            raise NotFound("no such API key")
        log.info("API key updated", extra={"fields": {"user_id": identity.user_id, "api_key_id": key_id}})
        return key

    async def delete_api_key(self, identity: Identity, key_id: str) -> None:
        if not await asyncio.to_thread(self.store.revoke_api_key, identity.user_id, key_id):
            raise NotFound("no such API key")
        log.info("API key revoked", extra={"fields": {"user_id": identity.user_id, "api_key_id": key_id}})

    async def verify_api_key(self, secret: str) -> Identity:
        if not secret.startswith(API_KEY_PREFIX):
            raise Unauthenticated("invalid API key")
        key = await asyncio.to_thread(self.store.api_key_by_hash, _sha256(secret))
        if key is None or key.revoked_at is not None:
            raise Unauthenticated("invalid or revoked API key")
        now = time.time()
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated("API key has expired")
        user = await asyncio.to_thread(self.store.user_by_id, key.user_id)
        if user is None:
            raise Unauthenticated("invalid or revoked API key")
        if key.last_used_at is None or now - key.last_used_at >= LAST_USED_GRANULARITY_SECONDS:
            await asyncio.to_thread(self.store.touch_api_key, key.id, now)
        return Identity(user.id, user.username, frozenset(user.roles), key.id, api_key_weight=key.share_weight)


def _api_key_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidArgument("name must be 1 to 100 characters")
    return name


def _check_share_weight(weight: float) -> None:
    if not 0 < weight <= MAX_SHARE_WEIGHT:  # NaN fails too
        raise InvalidArgument(f"share_weight must be greater than 0 and at most {MAX_SHARE_WEIGHT:g}")


def _encode_page_token(key: ApiKeyRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([key.created_at, key.id]).encode()).decode()


def _decode_page_token(token: str) -> tuple[float, str]:
    try:
        created, key_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), str(key_id)
    except (ValueError, TypeError):
        raise InvalidArgument("invalid page_token") from None
