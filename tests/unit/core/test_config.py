from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.core import config
from services.core.config import ConfigError, setting


@dataclasses.dataclass(frozen=True)
class Sample:
    port: int = setting(8080, min=1, max=65535)
    ratio: float = setting(0.5, min=0, max=1)
    enabled: bool = setting(False)
    name: str = setting("x", choices=("x", "y"))
    origins: tuple[str, ...] = setting(())
    path: Path | None = setting(None)
    password: str = setting("", secret=True, min=None)


def test_defaults_without_environment() -> None:
    assert config.load(Sample, {}) == Sample()


def test_values_are_converted_from_their_variables() -> None:
    env = {"PARLEY_PORT": "9000", "PARLEY_RATIO": "0.25", "PARLEY_ENABLED": "yes", "PARLEY_NAME": "y",
           "PARLEY_ORIGINS": "https://a.example, https://b.example", "PARLEY_PATH": "/tmp/x"}
    loaded = config.load(Sample, env)
    assert loaded == Sample(9000, 0.25, True, "y", ("https://a.example", "https://b.example"), Path("/tmp/x"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PARLEY_PORT": "http"}, "PARLEY_PORT='http': expected an integer"),
        ({"PARLEY_PORT": "70000"}, "PARLEY_PORT=70000: must be at most 65535"),
        ({"PARLEY_RATIO": "lots"}, "PARLEY_RATIO='lots': expected a number"),
        ({"PARLEY_ENABLED": "maybe"}, "PARLEY_ENABLED='maybe': expected true or false"),
        ({"PARLEY_NAME": "z"}, "PARLEY_NAME='z': expected one of x, y"),
    ],
)
def test_bad_values_name_the_variable_and_the_expectation(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(Sample, env)
    assert str(info.value) == message


def test_describe_masks_secrets() -> None:
    described = config.describe(config.load(Sample, {"PARLEY_PASSWORD": "hunter2hunter2"}))
    assert described["password"] == "***"
    assert "hunter2" not in repr(described)


def test_common_targets_default_to_loopback_ports() -> None:
    common = config.load(config.CommonSettings, {"PARLEY_CACHE_PORT": "6000", "PARLEY_AUTH_TARGET": "auth:50051"})
    assert common.target_of("cache") == "127.0.0.1:6000"
    assert common.target_of("auth") == "auth:50051"
