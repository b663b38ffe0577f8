"""Signing keys from a read-only directory (PARLEY_SIGNING_KEYS_DIR), laid out as Kubernetes mounts
a Secret: the newest file signs, every file is in the JWKS, the directory is never written, and a
directory without a usable key stops start-up with a message that says what to do."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from tests.unit.auth.auth_testing import PASSWORD, settings

from services.auth import key_files, tokens
from services.auth.service import AuthService
from services.auth.settings import AuthSettings
from services.auth.store import AuthStore
from services.core import config
from services.core.config import ConfigError
from services.core.errors import FailedPrecondition
from services.core.identity import CredentialVerifier, Identity, IdentitySettings

ADMIN = Identity("x", "root", frozenset({"user", "admin"}))


def pem(private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def secret_volume(directory: Path, files: dict[str, bytes]) -> Path:
    """What the kubelet writes for a Secret volume: the files in a timestamped folder, `..data`
    pointing at it, and one link per key. Replacing `files` swaps `..data`, as an update does."""
    directory.mkdir(exist_ok=True)
    versions = [p for p in directory.iterdir() if p.name.startswith("..") and not p.is_symlink()]
    version = directory / f"..2025_06_01_00_00_00.{len(versions)}"
    version.mkdir()
    for name, content in files.items():
        (version / name).write_bytes(content)
    data = directory / "..data"
    if data.is_symlink():
        data.unlink()
    data.symlink_to(version.name)
    for link in [p for p in directory.iterdir() if p.is_symlink() and not p.name.startswith(".")]:
        link.unlink()
    for name in files:
        (directory / name).symlink_to(f"..data/{name}")
    return directory


def snapshot(directory: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "",
                                            p.lstat().st_mtime)
            for p in sorted(directory.rglob("*"))}


def kid_of(private: ed25519.Ed25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_files.thumbprint(key_files._b64url(raw))


def verifier(service: AuthService) -> CredentialVerifier:
    return CredentialVerifier(service.jwks, service.verify_api_key, IdentitySettings(jwks_refetch_seconds=0))


async def started(store: AuthStore, keys_dir: Path) -> AuthService:
    service = AuthService(store, settings(signing_keys_dir=keys_dir), IdentitySettings())
    await service.start()
    return service


@pytest.fixture
def old_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def new_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


async def test_newest_key_signs_all_are_published_and_old_tokens_still_verify(
        store: AuthStore, tmp_path: Path, old_key: ed25519.Ed25519PrivateKey,
        new_key: ed25519.Ed25519PrivateKey) -> None:
    keys = secret_volume(tmp_path / "keys", {"signing-key-1.pem": pem(old_key), "signing-key-2.pem": pem(new_key)})
    service = await started(store, keys)
    user, pair = await service.register("alice", PASSWORD)

    assert jwt.get_unverified_header(pair.access_token)["kid"] == kid_of(new_key)
    assert {k["kid"] for k in await service.jwks()} == {kid_of(old_key), kid_of(new_key)}
    # A token the old key signed (before the new file was added) is still accepted.
    claims = jwt.decode(pair.access_token, options={"verify_signature": False})
    old_token = jwt.encode(claims, old_key, algorithm="EdDSA", headers={"kid": kid_of(old_key)})
    assert (await verifier(service).authenticate(old_token)).user_id == user.id
    assert (await verifier(service).authenticate(pair.access_token)).user_id == user.id


async def test_rotation_by_adding_a_file_keeps_everyone_signed_in(
        store: AuthStore, tmp_path: Path, old_key: ed25519.Ed25519PrivateKey,
        new_key: ed25519.Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = secret_volume(tmp_path / "keys", {"signing-key-1.pem": pem(old_key)})
    service = await started(store, keys)
    _, before = await service.register("alice", PASSWORD)
    assert jwt.get_unverified_header(before.access_token)["kid"] == kid_of(old_key)

    # The operator adds signing-key-2.pem to the Secret; the kubelet swaps ..data; the service
    # notices within RELOAD_SECONDS, without a restart.
    secret_volume(keys, {"signing-key-1.pem": pem(old_key), "signing-key-2.pem": pem(new_key)})
    monkeypatch.setattr(tokens, "RELOAD_SECONDS", 0.0)
    _, after = await service.login("alice", PASSWORD, "10.0.0.1")
    assert jwt.get_unverified_header(after.access_token)["kid"] == kid_of(new_key)
    assert (await verifier(service).authenticate(before.access_token)).username == "alice"

    # Once old tokens have expired the operator drops the old file: it leaves the JWKS.
    secret_volume(keys, {"signing-key-2.pem": pem(new_key)})
    assert [k["kid"] for k in await service.jwks()] == [kid_of(new_key)]


async def test_the_directory_is_only_read_and_the_store_keeps_no_key(
        store: AuthStore, tmp_path: Path, old_key: ed25519.Ed25519PrivateKey) -> None:
    keys = secret_volume(tmp_path / "keys", {"signing-key-1.pem": pem(old_key)})
    (keys / "README").write_text("not a key")  # files without .pem are skipped
    before = snapshot(keys)
    service = await started(store, keys)
    await service.register("alice", PASSWORD)
    await service.jwks()
    with pytest.raises(FailedPrecondition, match="PARLEY_SIGNING_KEYS_DIR.*adding a key file"):
        await service.rotate_signing_key(ADMIN)
    assert snapshot(keys) == before
    assert store.signing_keys() == []


def test_files_sort_naturally_and_a_renamed_file_keeps_its_kid(tmp_path: Path) -> None:
    generated = {n: ed25519.Ed25519PrivateKey.generate() for n in ("key-9.pem", "key-10.pem", "key-2.pem")}
    for name, private in generated.items():
        (tmp_path / name).write_bytes(pem(private))
    assert [k.name for k in key_files.read_key_dir(tmp_path)] == ["key-2.pem", "key-9.pem", "key-10.pem"]
    kid = kid_of(generated["key-2.pem"])
    (tmp_path / "key-2.pem").rename(tmp_path / "key-11.pem")
    newest = key_files.read_key_dir(tmp_path)[-1]
    assert (newest.name, newest.kid) == ("key-11.pem", kid)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_a_key_made_by_the_documented_openssl_command_loads(tmp_path: Path) -> None:
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "signing-key-1.pem")],
                   check=True, capture_output=True)
    (key,) = key_files.read_key_dir(tmp_path)
    token = jwt.encode({"sub": "x"}, key.private, algorithm="EdDSA")
    assert jwt.decode(token, key.private.public_key(), algorithms=["EdDSA"]) == {"sub": "x"}


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such directory"),
    ({}, r"no \*\.pem key file in it.*openssl genpkey -algorithm ed25519"),
    ({"README.txt": b"hello"}, r"no \*\.pem key file"),
    ({"signing-key-1.pem": b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"},
     "signing-key-1.pem is not an unencrypted PEM private key"),
    ({"signing-key-1.pem": pem(ec.generate_private_key(ec.SECP256R1()))}, "signing-key-1.pem is not an Ed25519 key"),
    ({"signing-key-1.pem": ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"))}, "not an unencrypted PEM private key"),
], ids=["missing", "empty", "no-pem", "garbage", "not-ed25519", "encrypted"])
async def test_a_directory_without_a_usable_key_stops_start_up(
        store: AuthStore, tmp_path: Path, content: dict[str, bytes] | None, message: str) -> None:
    keys = tmp_path / "keys"
    if content is not None:
        secret_volume(keys, content)
    with pytest.raises(ConfigError, match=f"PARLEY_SIGNING_KEYS_DIR.*{message}"):
        await started(store, keys)
    assert store.signing_keys() == []  # no silent fallback to keys of its own


async def test_a_broken_file_added_later_keeps_the_loaded_keys(
        store: AuthStore, tmp_path: Path, old_key: ed25519.Ed25519PrivateKey,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    keys = secret_volume(tmp_path / "keys", {"signing-key-1.pem": pem(old_key)})
    service = await started(store, keys)
    secret_volume(keys, {"signing-key-1.pem": pem(old_key), "signing-key-2.pem": b"oops"})
    monkeypatch.setattr(tokens, "RELOAD_SECONDS", 0.0)
    _, pair = await service.register("alice", PASSWORD)
    assert jwt.get_unverified_header(pair.access_token)["kid"] == kid_of(old_key)
    assert [k["kid"] for k in await service.jwks()] == [kid_of(old_key)]
    assert "signing keys not reloaded" in caplog.text


def test_the_setting_is_read_from_the_environment(tmp_path: Path) -> None:
    loaded = config.load(AuthSettings, {"PARLEY_SIGNING_KEYS_DIR": str(tmp_path)})
    assert loaded.signing_keys_dir == tmp_path
    assert config.load(AuthSettings, {}).signing_keys_dir is None
    assert os.fspath(tmp_path) in str(config.describe(loaded)["signing_keys_dir"])
