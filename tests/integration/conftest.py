"""Fixtures that start the real stack: four Python services, the real bundled model and Envoy,
on free loopback ports with a temporary data dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack import Stack, free_port


def stack_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "PARLEY_DATA_DIR": str(data_dir),
        "PARLEY_HTTP_PORT": str(free_port()),
        "PARLEY_ADMIN_PORT": str(free_port()),
        "PARLEY_AUTH_PORT": str(free_port()),
        "PARLEY_SESSION_PORT": str(free_port()),
        "PARLEY_CACHE_PORT": str(free_port()),
        "PARLEY_INFERENCE_PORT": str(free_port()),
        "PARLEY_ALLOW_REGISTRATION": "true",
        "PARLEY_HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
        "PARLEY_SHUTDOWN_GRACE_SECONDS": "2",
    }
    env.update(overrides)
    return env


def start_stack(data_dir: Path, **overrides: str) -> Stack:
    stack = Stack(env=stack_env(data_dir, **overrides), log_dir=data_dir / "logs")
    stack.start()
    try:
        stack.wait_healthy(timeout=180)
    except Exception:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One shared stack. Two slots and a queue of two, so that queue-full is reachable."""
    data_dir = tmp_path_factory.mktemp("stack")
    running = start_stack(data_dir, PARLEY_PARALLEL_SLOTS="2", PARLEY_QUEUE_DEPTH="2", PARLEY_CONTEXT_LENGTH="2048")
    yield running
    running.stop()


@pytest.fixture
def base_url(stack: Stack) -> str:
    return stack.url


def artifacts_dir() -> Path:
    path = Path(os.environ.get("PARLEY_TEST_ARTIFACTS", "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
