"""The operator CLI, run as a real process: passwords come from stdin, never argv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.auth.service import AuthService
from services.auth.store import AuthStore
from services.core.identity import IdentitySettings
from services.stack import ROOT
from tests.unit.auth.auth_testing import FAST

CHEAP = {"PARLEY_ARGON2_TIME_COST": "1", "PARLEY_ARGON2_MEMORY_KIB": "1024"}


def cli(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(CHEAP, PARLEY_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "services.auth.cli", *args], input=stdin, text=True,
                          capture_output=True, env=env, cwd=ROOT, timeout=60)


async def login_roles(data_dir: Path, username: str, password: str) -> tuple[str, ...]:
    store = AuthStore(data_dir / "auth.db")
    try:
        user, _ = await AuthService(store, FAST, IdentitySettings()).login(username, password, "127.0.0.1")
        return user.roles
    finally:
        store.close()


async def test_create_user_set_role_and_reset_password(tmp_path: Path) -> None:
    created = cli(tmp_path, "create-user", "Olivia", stdin="first-Secret-1\n")
    assert created.returncode == 0, created.stderr
    assert "first-Secret-1" not in created.stdout + created.stderr
    assert await login_roles(tmp_path, "olivia", "first-Secret-1") == ("user",)

    assert cli(tmp_path, "set-role", "olivia", "admin").returncode == 0
    assert await login_roles(tmp_path, "olivia", "first-Secret-1") == ("user", "admin")
    assert cli(tmp_path, "set-role", "olivia", "user").returncode == 0
    assert await login_roles(tmp_path, "olivia", "first-Secret-1") == ("user",)

    reset = cli(tmp_path, "reset-password", "OLIVIA", stdin="second-Secret-2\n")
    assert reset.returncode == 0, reset.stderr
    assert await login_roles(tmp_path, "olivia", "second-Secret-2") == ("user",)


def test_errors_are_clear_and_exit_nonzero(tmp_path: Path) -> None:
    weak = cli(tmp_path, "create-user", "pat", stdin="short\n")
    assert weak.returncode == 1 and "too short" in weak.stderr
    assert cli(tmp_path, "create-user", "pat", "--admin", stdin="fine-Secret-3\n").returncode == 0
    taken = cli(tmp_path, "create-user", "PAT", stdin="fine-Secret-3\n")
    assert taken.returncode == 1 and "taken" in taken.stderr
    missing = cli(tmp_path, "set-role", "nobody", "admin")
    assert missing.returncode == 1 and "no user named" in missing.stderr
    no_password = cli(tmp_path, "reset-password", "pat", stdin="")
    assert no_password.returncode == 1 and "no password" in no_password.stderr
    # There is no way to pass a password as an argument.
    assert cli(tmp_path, "create-user", "sam", "--password", "x").returncode == 2
