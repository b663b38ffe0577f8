"""Typed settings from PARLEY_* environment variables.

Each service declares a frozen dataclass whose fields have laptop-friendly defaults; `load()` reads
`PARLEY_<FIELD>` for each field, converts it to the field's type and checks its bounds. A bad value
stops start-up with a message that names the variable, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "PARLEY_"
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def setting(default: Any, *, min: float | None = None, max: float | None = None,
            choices: tuple[str, ...] | None = None, secret: bool = False, help: str = "") -> Any:
    """A settings field with bounds. `secret` fields are never printed."""
    meta = {"min": min, "max": max, "choices": choices, "secret": secret, "help": help}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _convert(raw: str, kind: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw == "":
            return None
        return _convert(raw, args[0], name)
    if origin is tuple:
        (item,) = typing.get_args(kind)[:1]
        return tuple(_convert(part.strip(), item, name) for part in raw.split(",") if part.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if kind is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if kind is Path:
        return Path(raw).expanduser()
    if kind is str:
        return raw
    raise TypeError(f"unsupported settings type {kind!r} for {name}")


def _check(value: Any, field: dataclasses.Field, name: str) -> None:
    meta = field.metadata
    shown = "(secret)" if meta.get("secret") else repr(value)
    if meta.get("min") is not None and value is not None and value < meta["min"]:
        raise ConfigError(f"{name}={shown}: must be at least {meta['min']}")
    if meta.get("max") is not None and value is not None and value > meta["max"]:
        raise ConfigError(f"{name}={shown}: must be at most {meta['max']}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name}={shown}: expected one of {', '.join(choices)}")


def load(cls: type[T], env: Mapping[str, str] | None = None) -> T:
    """Builds `cls` from the environment, raising ConfigError on the first bad value."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = env_name(field.name)
        if name in env:
            value = _convert(env[name], hints[field.name], name)
        else:
            value = field.default
        _check(value, field, name)
        values[field.name] = value
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def describe(settings: Any) -> dict[str, Any]:
    """The settings as a dict for a start-up log line, with secrets masked."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.metadata.get("secret"):
            value = "***" if value else ""
        elif isinstance(value, Path):
            value = str(value)
        out[field.name] = value
    return out


@dataclasses.dataclass(frozen=True)
class CommonSettings:
    """Settings every service reads: where to listen, where the others are, logging."""

    host: str = setting("127.0.0.1", help="address to bind gRPC servers to")
    auth_port: int = setting(50051, min=0, max=65535)
    session_port: int = setting(50052, min=0, max=65535)
    cache_port: int = setting(50053, min=0, max=65535)
    inference_port: int = setting(50054, min=0, max=65535)
    # The session service's WebSocket bridge (services/session/websocket.py): plain HTTP/1.1, which
    # Envoy upgrades GET /v1/sessions/{id}:connect to. 0 turns the bridge off.
    session_websocket_port: int = setting(50062, min=0, max=65535)
    # Where to reach each service; empty means 127.0.0.1:<its port>. Envoy's config (services/gateway)
    # also takes several, comma separated (replicas on one machine); the services' channels take one.
    auth_target: str = setting("")
    session_target: str = setting("")
    cache_target: str = setting("")
    inference_target: str = setting("")
    session_websocket_target: str = setting("")
    data_dir: Path = setting(Path(".parley"), help="where SQLite files and keys live")
    log_level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    shutdown_grace_seconds: float = setting(10.0, min=0)

    def port_of(self, service: str) -> int:
        return int(getattr(self, f"{service}_port"))

    def target_of(self, service: str) -> str:
        return getattr(self, f"{service}_target") or f"127.0.0.1:{self.port_of(service)}"


DATABASE_SCHEMES = ("postgresql", "postgres")


@dataclasses.dataclass(frozen=True)
class DatabaseSettings:
    """Where auth, session and the cache's usage ledger keep their data (services/core/database.py). Unset URL: one SQLite
    file each in the data dir (one replica). Set: PostgreSQL, shared by every replica. The URL
    holds a password: it is a secret, never printed or logged."""

    database_url: str = setting(
        "", secret=True,
        help="postgresql://user:password@host:port/dbname (libpq options such as ?sslmode=verify-full&"
             "sslrootcert=/path as query parameters); unset: SQLite files in the data dir")
    database_pool_size: int = setting(10, min=1, max=500, help="most connections one process opens")
    database_pool_timeout_seconds: float = setting(
        5.0, min=0.1, max=300, help="longest wait for a connection before the call fails with 503")
    database_connect_timeout_seconds: int = setting(5, min=2, max=300, help="longest wait to open a connection")
    database_statement_timeout_seconds: float = setting(
        15.0, min=0.1, max=3600, help="longest a statement may run (and a lock be waited for) on the server")
    database_startup_timeout_seconds: float = setting(
        60.0, min=0, max=3600, help="how long a starting service waits for the database before it gives up")
    database_retry_after_seconds: int = setting(
        2, min=1, max=600, help="Retry-After of the 503 a call gets while the database is unreachable")

    def validate(self) -> None:
        if not self.database_url:
            return
        scheme = self.database_url.partition("://")[0].lower()
        if scheme not in DATABASE_SCHEMES:
            # The value is never echoed: it may hold a password.
            raise ConfigError(f"PARLEY_DATABASE_URL must start with postgresql:// (got a URL of scheme {scheme!r})")
        try:
            from psycopg.conninfo import conninfo_to_dict

            parts = conninfo_to_dict(self.database_url)
            if not all(port.strip().isdigit() for port in str(parts.get("port") or "5432").split(",")):
                raise ValueError("port")
        except ImportError:
            raise ConfigError("PARLEY_DATABASE_URL is set but psycopg is not installed; run `make setup`") from None
        except Exception:  # noqa: BLE001 - libpq's parser says why, but its message may quote the URL
            raise ConfigError("PARLEY_DATABASE_URL is not a valid postgresql:// URL (the value is not shown: it "
                              "may hold a password)") from None

    @property
    def uses_postgres(self) -> bool:
        return bool(self.database_url)
