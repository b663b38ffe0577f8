"""The gateway and the platform: health, reflection, JSON errors, CORS, the launcher's behaviour."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.stack import ROOT, Stack
from tests.integration.conftest import Caller, stack_env

PUBLIC = {
    "auth": "parley.auth.v1.AuthService",
    "session": "parley.session.v1.SessionService",
    "cache": "parley.cache.v1.CacheService",
    "inference": "parley.inference.v1.InferenceService",
}


def test_healthz_is_200_when_every_service_serves(base_url: str) -> None:
    response = httpx.get(f"{base_url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "SERVING"}


def test_unknown_path_is_a_json_404(base_url: str) -> None:
    response = httpx.get(f"{base_url}/v1/no-such-thing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert "message" in response.json()


def test_grpc_error_becomes_json_with_http_status(base_url: str) -> None:
    response = httpx.get(f"{base_url}/v1/users/me")
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0] and body["message"]


def test_api_replies_are_not_stored_sniffed_or_signed_by_envoy(base_url: str, user: Caller) -> None:
    login = httpx.post(f"{base_url}/v1/auth/login", json={"username": user.username, "password": "Plenty-long-passphrase-42"})
    me = httpx.get(f"{base_url}/v1/users/me", headers=user.headers)
    failed = httpx.get(f"{base_url}/v1/users/me")
    for reply in (login, me, failed):
        assert reply.headers.get("cache-control") == "no-store", reply.headers
        assert reply.headers.get("x-content-type-options") == "nosniff"
        assert "server" not in reply.headers and "x-envoy-upstream-service-time" not in reply.headers
    assert login.status_code == 200 and me.status_code == 200 and failed.status_code == 401
    page = httpx.get(f"{base_url}/")  # the web app keeps its own caching rules
    assert page.status_code == 200 and page.headers.get("cache-control") != "no-store"


@pytest.mark.parametrize("path", ["/v1/sessions/{}", "/v1/sessions?page_token={}", "/v1/models/{}"])
def test_a_path_too_long_is_414_every_time(base_url: str, user: Caller, path: str) -> None:
    for size in (5_000, 12_000, 20_000):
        answer = httpx.get(f"{base_url}{path.format('a' * size)}", headers=user.headers)
        assert answer.status_code == 414 and "longer than 4096" in answer.json()["message"], answer.text


@pytest.mark.parametrize("service", sorted(PUBLIC))
def test_each_service_answers_health_and_reflection(stack: Stack, service: str) -> None:
    target = f"127.0.0.1:{stack.common.port_of(service)}"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=PUBLIC[service]), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert PUBLIC[service] in names
    assert "grpc.health.v1.Health" in names


def test_internal_services_are_not_routed(base_url: str) -> None:
    response = httpx.post(f"{base_url}/internal/v1/completions:lookup", json={})
    assert response.status_code == 404


def test_cors_preflight_allows_configured_origin_only(tmp_path: Path) -> None:
    from services.core import config
    from services.gateway import envoy_config

    env = stack_env(tmp_path, PARLEY_CORS_ORIGINS="https://app.example")
    built = envoy_config.build(config.load(envoy_config.GatewaySettings, env), config.load(config.CommonSettings, env))
    host = built["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
    policy = host["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert policy["allow_origin_string_match"] == [{"exact": "https://app.example"}]


def test_cors_preflight_through_envoy(base_url: str) -> None:
    # The shared stack has no CORS origins: a cross-origin preflight gets no allow-origin header.
    response = httpx.options(
        f"{base_url}/v1/models",
        headers={"origin": "https://evil.example", "access-control-request-method": "GET"},
    )
    assert "access-control-allow-origin" not in response.headers


def test_admin_interface_listens_on_loopback_only(stack: Stack) -> None:
    admin = stack.gateway.admin_port
    assert httpx.get(f"http://127.0.0.1:{admin}/ready").status_code == 200
    built = json.loads((stack.common.data_dir / "envoy.yaml").read_text())
    assert built["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": admin}


def _launch(tmp_path: Path, **overrides: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = {**os.environ, **stack_env(tmp_path, **overrides)}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.stack"], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return process, env


def _read_until(process: subprocess.Popen[str], needle: str, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output was:\n{''.join(lines)}")


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_launcher_prints_url_healthz_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    process, env = _launch(tmp_path)
    try:
        lines = _read_until(process, "ready at")
        url = f"http://127.0.0.1:{env['PARLEY_HTTP_PORT']}"
        assert url in lines[-1]
        assert httpx.get(f"{url}/healthz").status_code == 200
        app = httpx.get(url)  # the printed URL opens the web app
        assert app.status_code == 200 and app.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/app.js">' in app.text
        children = _children_of(process.pid)
        assert len(children) == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        time.sleep(0.2)
        alive = [pid for pid in children if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0]
        assert alive == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_launcher_names_a_dead_service_and_why_and_restarts_it(tmp_path: Path) -> None:
    process, env = _launch(tmp_path)
    try:
        _read_until(process, "ready at")
        cache_pid = next(
            pid for pid in _children_of(process.pid)
            if "services.cache" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        )
        os.kill(cache_pid, signal.SIGKILL)
        said = "".join(_read_until(process, "restarted cache", timeout=30))
        assert "cache killed by signal 9" in said and "restarting cache in 0.5 s" in said
        url = f"http://127.0.0.1:{env['PARLEY_HTTP_PORT']}/healthz"
        deadline = time.monotonic() + 30
        while httpx.get(url).status_code != 200:
            assert time.monotonic() < deadline, "the restarted cache never served"
            time.sleep(0.2)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_healthz_names_the_unhealthy_service(tmp_path: Path) -> None:
    from tests.integration.conftest import start_stack

    stack = start_stack(tmp_path)
    try:
        cache = next(p for p in stack.processes if p.name == "cache")
        cache.popen.send_signal(signal.SIGTERM)
        cache.popen.wait(timeout=15)
        status, body = stack.health()
        assert status == 503
        assert '"cache"' in body and '"auth"' not in body
    finally:
        stack.stop()


def test_bad_config_value_stops_start_up_with_a_clear_message() -> None:
    env = {**os.environ, "PARLEY_AUTH_PORT": "not-a-port"}
    result = subprocess.run([sys.executable, "-m", "services.auth"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "PARLEY_AUTH_PORT='not-a-port': expected an integer" in result.stderr
