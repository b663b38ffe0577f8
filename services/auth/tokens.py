"""Signing keys and access tokens: Ed25519 keys persisted in the store, JWTs signed with EdDSA.

The current key signs; after a rotation the previous keys stay in the JWKS until every token they
signed has expired, so rotating logs nobody out.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth.store import AuthStore, SigningKeyRecord

ALGORITHM = "EdDSA"
CLOCK_SKEW_SECONDS = 60  # how long after expiry a retired key still verifies, for slow clocks
RELOAD_SECONDS = 30.0  # how often a replica re-reads the keys, to notice another replica's rotation


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key() -> tuple[str, str, str]:
    """A fresh Ed25519 key: (kid, private key PEM, public key as JWK `x`)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64url(secrets.token_bytes(12)), pem, _b64url(raw)


def jwk_of(record: SigningKeyRecord) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": record.public_x, "kid": record.kid, "alg": ALGORITHM, "use": "sig"}


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int


class TokenIssuer:
    """Signs access tokens with the current key and publishes the keys that still verify."""

    def __init__(self, store: AuthStore, issuer: str, audience: str, ttl_seconds: int) -> None:
        self._store = store
        self._issuer = issuer
        self._audience = audience
        self.ttl_seconds = ttl_seconds
        self._keys: list[SigningKeyRecord] = []
        self._current: tuple[str, Ed25519PrivateKey] | None = None
        self._loaded_at = 0.0

    def load(self) -> None:
        """Reads the keys; creates the first one when there is none."""
        keys = self._store.signing_keys()
        if not any(k.retired_at is None for k in keys):
            self._store.add_signing_key(*new_key(), retire_after=self._retire_after())
            keys = self._store.signing_keys()
        current = next(k for k in reversed(keys) if k.retired_at is None)
        private = serialization.load_pem_private_key(current.private_pem.encode(), password=None)
        assert isinstance(private, Ed25519PrivateKey)
        self._keys = keys
        self._current = (current.kid, private)
        self._loaded_at = time.monotonic()

    def _retire_after(self) -> float:
        return self.ttl_seconds + CLOCK_SKEW_SECONDS

    def rotate(self) -> str:
        kid, pem, x = new_key()
        self._store.add_signing_key(kid, pem, x, retire_after=self._retire_after())
        self.load()
        return kid

    def jwks(self) -> list[dict[str, str]]:
        self.load()
        now = time.time()
        return [jwk_of(k) for k in self._keys if k.verify_until is None or k.verify_until >= now]

    def issue(self, user_id: str, username: str, roles: tuple[str, ...]) -> IssuedToken:
        if self._current is None or time.monotonic() - self._loaded_at > RELOAD_SECONDS:
            self.load()
        assert self._current is not None
        kid, private = self._current
        now = int(time.time())
        claims = {
            "iss": self._issuer, "aud": self._audience, "sub": user_id, "preferred_username": username,
            "roles": list(roles), "iat": now, "nbf": now, "exp": now + self.ttl_seconds, "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": kid})
        return IssuedToken(token, self.ttl_seconds)
