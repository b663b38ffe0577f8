"""Account administration on the auth service's store, for operators:

    python -m services.auth.cli create-user alice [--admin]
    python -m services.auth.cli set-role alice admin      # roles: user (always kept), admin
    python -m services.auth.cli set-role alice user       # takes admin away
    python -m services.auth.cli reset-password alice      # also signs alice out everywhere

Passwords are read from a prompt (asked twice) or, when stdin is not a terminal, from its first
line — never from the command line, where other users and shell history would see them. It works
while the service runs (SQLite WAL, or PostgreSQL). PARLEY_DATABASE_URL, else PARLEY_DATA_DIR or
--data-dir, says where the store is.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import sys
from pathlib import Path

from services.auth.service import AuthService
from services.auth.settings import AuthSettings
from services.auth.store import AuthStore
from services.core import config, database
from services.core.errors import ParleyError
from services.core.identity import ROLE_ADMIN, ROLE_USER, IdentitySettings


class UsageError(Exception):
    pass


def read_password() -> str:
    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("no password on stdin")
        return password
    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat it: ") != password:
        raise UsageError("the passwords differ")
    return password


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.auth.cli", description="Parley account administration")
    p.add_argument("--data-dir", type=Path, help="the services' data dir (default: PARLEY_DATA_DIR or .parley)")
    commands = p.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-user", help="create an account (password from a prompt or stdin)")
    create.add_argument("username")
    create.add_argument("--admin", action="store_true", help="give it the admin role")
    role = commands.add_parser("set-role", help="set an account's roles (user is always kept)")
    role.add_argument("username")
    role.add_argument("roles", nargs="+", choices=(ROLE_USER, ROLE_ADMIN))
    reset = commands.add_parser("reset-password", help="set a new password and sign the account out everywhere")
    reset.add_argument("username")
    return p


async def execute(args: argparse.Namespace, service: AuthService) -> str:
    if args.command == "create-user":
        roles = (ROLE_USER, ROLE_ADMIN) if args.admin else (ROLE_USER,)
        user = await service.create_user(args.username, read_password(), roles)
        return f"created {user.username} (id {user.id}, roles {', '.join(user.roles)})"
    if args.command == "set-role":
        user = await service.set_roles(args.username, tuple(args.roles))
        return f"{user.username} now has roles {', '.join(user.roles)}"
    await service.reset_password(args.username, read_password())
    return f"password of {args.username} reset; its sessions are signed out"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        common = config.load(config.CommonSettings)
        if args.data_dir is not None:
            common = dataclasses.replace(common, data_dir=args.data_dir)
        settings = config.load(AuthSettings)
        identity = config.load(IdentitySettings)
        where = database.location(common.data_dir, config.load(config.DatabaseSettings), "auth")
    except config.ConfigError as exc:
        print(f"auth-cli: configuration error: {exc}", file=sys.stderr)
        return 2
    store = AuthStore(where)
    try:
        print(asyncio.run(execute(args, AuthService(store, settings, identity))))
        return 0
    except (ParleyError, UsageError) as exc:
        print(f"auth-cli: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
