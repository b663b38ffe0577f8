"""Signing keys read from a directory (PARLEY_SIGNING_KEYS_DIR), e.g. a mounted Kubernetes Secret.

Layout: one Ed25519 private key per `*.pem` file, unencrypted PKCS#8 PEM — what
`openssl genpkey -algorithm ed25519 -out <name>.pem` writes. The file whose name sorts last signs
new tokens; names sort naturally (`key-10` after `key-9`), so number or date them
(`signing-key-2.pem`, `2025-06-01.pem`). Every key in the directory is published in the JWKS, so
tokens signed by an older key verify until its file is removed.

The kid is the key's RFC 7638 thumbprint (base64url SHA-256 of its public JWK): it does not change
when a file is renamed, and every replica computes the same one. Hidden entries (a Secret volume's
`..data` links) and files not ending in `.pem` are skipped. The directory is only ever read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.core.config import ConfigError

SETTING = "PARLEY_SIGNING_KEYS_DIR"
SUFFIX = ".pem"
GENERATE = "openssl genpkey -algorithm ed25519 -out signing-key-1.pem"


@dataclass(frozen=True)
class KeyFile:
    name: str
    kid: str
    private: Ed25519PrivateKey
    public_x: str  # the public key as a JWK `x`


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(public_x: str) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without white space."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": public_x}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def natural_order(name: str) -> list[str | int]:
    # re.split with a group alternates text and digits, so equal positions always hold equal types.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def _read(path: Path) -> KeyFile:
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{SETTING}: cannot read {path.name}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{SETTING}: {path.name} is not an unencrypted PEM private key "
                          f"(make one with `{GENERATE}`)") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{SETTING}: {path.name} is not an Ed25519 key (make one with `{GENERATE}`)")
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = _b64url(raw)
    return KeyFile(path.name, thumbprint(x), private, x)


def read_key_dir(directory: Path) -> list[KeyFile]:
    """The keys in `directory`, oldest first: the last one signs. ConfigError when the directory
    is missing or holds no usable key, or when any `.pem` file in it is not an Ed25519 key — a
    key silently skipped would log out everyone whose token it signed."""
    if not directory.is_dir():
        raise ConfigError(f"{SETTING}={directory}: no such directory")
    names = sorted((p.name for p in directory.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")),
                   key=natural_order)
    if not names:
        raise ConfigError(f"{SETTING}={directory}: no *{SUFFIX} key file in it (make one with `{GENERATE}`)")
    keys: dict[str, KeyFile] = {}
    for name in names:
        key = _read(directory / name)
        keys.pop(key.kid, None)  # the same key under two names counts once, at its newest place
        keys[key.kid] = key
    return list(keys.values())
