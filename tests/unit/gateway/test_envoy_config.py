"""The Envoy config generator: session-affine inference routing for Kubernetes (PARLEY_INFERENCE_LB),
and the local default it must leave alone."""

from __future__ import annotations

from typing import Any

import pytest

from services.core import config
from services.gateway import envoy_config

K8S_TARGETS = {
    "PARLEY_AUTH_TARGET": "auth:50051",
    "PARLEY_SESSION_TARGET": "session:50052",
    "PARLEY_CACHE_TARGET": "cache:50053",
    "PARLEY_INFERENCE_TARGET": "inference-headless:50054",
}


def build(env: dict[str, str]) -> dict[str, Any]:
    return envoy_config.build(config.load(envoy_config.GatewaySettings, env), config.load(config.CommonSettings, env))


def clusters(built: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in built["static_resources"]["clusters"]}


def routes(built: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes to upstreams (the web app's direct responses are left out)."""
    listener = built["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]


def test_local_default_balances_round_robin_without_hashing() -> None:
    built = build({})

    assert all("lb_policy" not in c for c in clusters(built).values())  # Envoy's default: ROUND_ROBIN
    assert all("hash_policy" not in r["route"] for r in routes(built))


@pytest.mark.parametrize(("setting", "policy"), [("ring_hash", "RING_HASH"), ("maglev", "MAGLEV")])
def test_consistent_hash_pins_a_session_to_one_inference_replica(setting: str, policy: str) -> None:
    built = build({**K8S_TARGETS, "PARLEY_INFERENCE_LB": setting})
    by_name = clusters(built)

    inference = by_name["inference"]
    assert inference["lb_policy"] == policy
    # Every address of the headless Service becomes its own host on the ring.
    assert inference["type"] == "STRICT_DNS"
    address = inference["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "inference-headless", "port_value": 50054}
    # Other services keep the default policy.
    assert all("lb_policy" not in by_name[name] for name in ("auth", "session", "cache"))

    to_inference = [r for r in routes(built) if r["route"]["cluster"] == "inference"]
    # Generate, CreateChatCompletion and the rest of InferenceService all carry the hash.
    assert {r["match"].get("path") for r in to_inference} >= set(envoy_config.STREAMING_METHODS["inference"])
    for route in to_inference:
        assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-parley-session-id"}}]
    assert all("hash_policy" not in r["route"] for r in routes(built) if r["route"]["cluster"] != "inference")


def test_streaming_inference_routes_keep_no_timeout_when_hashed() -> None:
    built = build({**K8S_TARGETS, "PARLEY_INFERENCE_LB": "ring_hash"})

    streaming = [r for r in routes(built) if r["match"].get("path") in envoy_config.STREAMING_METHODS["inference"]]
    assert streaming and all(r["route"]["timeout"] == "0s" for r in streaming)


def test_unknown_balancing_policy_is_rejected_with_the_variable_named() -> None:
    with pytest.raises(config.ConfigError, match="PARLEY_INFERENCE_LB='least_request'.*round_robin, ring_hash, maglev"):
        build({"PARLEY_INFERENCE_LB": "least_request"})


def test_only_the_connect_path_upgrades_to_a_websocket_on_the_session_bridges() -> None:
    built = build({**K8S_TARGETS, "PARLEY_SESSION_WEBSOCKET_TARGET": "session:50062"})
    hcm = built["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket", "enabled": False}]
    upgrading = [r for r in routes(built) if "upgrade_configs" in r["route"]]
    assert len(upgrading) == 1
    route = upgrading[0]
    assert route["match"] == {"safe_regex": {"regex": "^/v1/sessions/[^/:]+:connect$"}}
    assert route["route"]["cluster"] == "session_websocket" and route["route"]["timeout"] == "0s"
    assert route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]["disabled"] is True
    bridge = clusters(built)["session_websocket"]
    assert "typed_extension_protocol_options" not in bridge  # HTTP/1.1: the upgrade, not gRPC
    endpoint = bridge["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (endpoint["address"], endpoint["port_value"]) == ("session", 50062)
    assert bridge["health_checks"][0]["http_health_check"] == {"path": "/healthz"}
