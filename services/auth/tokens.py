"""Signing keys and access tokens: Ed25519 keys, JWTs signed with EdDSA.

The keys come from one of two places:
- the store (the default): the service makes the first key and rotates on request; after a
  rotation the previous keys stay in the JWKS until every token they signed has expired, so
  rotating logs nobody out;
- a read-only directory (PARLEY_SIGNING_KEYS_DIR, e.g. a Kubernetes Secret; key_files.py): the
  newest file signs, every file is published, and rotating means adding a file to it.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth import key_files
from services.auth.store import AuthStore
from services.core.config import ConfigError
from services.core.errors import FailedPrecondition

ALGORITHM = "EdDSA"
CLOCK_SKEW_SECONDS = 60  # how long after expiry a retired key still verifies, for slow clocks
RELOAD_SECONDS = 30.0  # how often the keys are re-read, to notice another replica's rotation or a new key file

log = logging.getLogger("parley.auth")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key() -> tuple[str, str, str]:
    """A fresh Ed25519 key: (kid, private key PEM, public key as JWK `x`)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64url(secrets.token_bytes(12)), pem, _b64url(raw)


def jwk_of(kid: str, public_x: str) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": public_x, "kid": kid, "alg": ALGORITHM, "use": "sig"}


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int


class TokenIssuer:
    """Signs access tokens with the current key and publishes the keys that still verify."""

    def __init__(self, store: AuthStore, issuer: str, audience: str, ttl_seconds: int,
                 keys_dir: Path | None = None) -> None:
        self._store = store
        self._issuer = issuer
        self._audience = audience
        self.ttl_seconds = ttl_seconds
        self.keys_dir = keys_dir
        self._published: list[dict[str, str]] = []
        self._current: tuple[str, Ed25519PrivateKey] | None = None
        self._loaded_at = 0.0

    @property
    def signing_kid(self) -> str | None:
        return self._current[0] if self._current else None

    def load(self) -> None:
        """Reads the keys. From the store, creates the first one when there is none; from a
        directory, raises ConfigError when it holds no valid key."""
        if self.keys_dir is not None:
            files = key_files.read_key_dir(self.keys_dir)
            self._published = [jwk_of(k.kid, k.public_x) for k in files]
            self._current = (files[-1].kid, files[-1].private)
        else:
            self._load_from_store()
        self._loaded_at = time.monotonic()

    def _load_from_store(self) -> None:
        keys = self._store.signing_keys()
        if not any(k.retired_at is None for k in keys):
            self._store.add_signing_key(*new_key(), retire_after=self._retire_after())
            keys = self._store.signing_keys()
        current = next(k for k in reversed(keys) if k.retired_at is None)
        private = serialization.load_pem_private_key(current.private_pem.encode(), password=None)
        assert isinstance(private, Ed25519PrivateKey)
        now = time.time()
        self._published = [jwk_of(k.kid, k.public_x) for k in keys if k.verify_until is None or k.verify_until >= now]
        self._current = (current.kid, private)

    def _reload(self) -> None:
        """A re-read while serving. A key directory edited into a bad state (a Secret updated with
        a broken file) keeps the keys already loaded rather than stopping sign-in."""
        try:
            self.load()
        except ConfigError as exc:
            if self._current is None:
                raise
            log.error("signing keys not reloaded; the ones loaded before stay in use",
                      extra={"fields": {"error": str(exc)}})
            self._loaded_at = time.monotonic()

    def _retire_after(self) -> float:
        return self.ttl_seconds + CLOCK_SKEW_SECONDS

    def rotate(self) -> str:
        if self.keys_dir is not None:
            raise FailedPrecondition(
                f"signing keys come from {key_files.SETTING}, which this service never writes: rotate by "
                "adding a key file whose name sorts last, and remove the old one once its tokens have expired")
        kid, pem, x = new_key()
        self._store.add_signing_key(kid, pem, x, retire_after=self._retire_after())
        self.load()
        return kid

    def jwks(self) -> list[dict[str, str]]:
        self._reload()
        return list(self._published)

    def issue(self, user_id: str, username: str, roles: tuple[str, ...]) -> IssuedToken:
        if self._current is None or time.monotonic() - self._loaded_at > RELOAD_SECONDS:
            self._reload()
        assert self._current is not None
        kid, private = self._current
        now = int(time.time())
        claims = {
            "iss": self._issuer, "aud": self._audience, "sub": user_id, "preferred_username": username,
            "roles": list(roles), "iat": now, "nbf": now, "exp": now + self.ttl_seconds, "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": kid})
        return IssuedToken(token, self.ttl_seconds)
