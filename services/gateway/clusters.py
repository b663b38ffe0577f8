"""The gateway's upstream clusters: each service's gRPC replicas (health-checked, balanced), the
session replicas' WebSocket bridges, and the OpenTelemetry collector with Envoy's tracer."""

from __future__ import annotations

from typing import Any

INFERENCE_LB_POLICIES = {"round_robin": "ROUND_ROBIN", "ring_hash": "RING_HASH", "maglev": "MAGLEV"}
WEBSOCKET_CLUSTER = "session_websocket"


def endpoint(target: str) -> dict[str, Any]:
    host, _, port = target.strip().rpartition(":")
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}


def grpc_cluster(name: str, target: str) -> dict[str, Any]:
    """An HTTP/2 (gRPC) cluster of every address `target` (host:port, or several separated by
    commas: replicas on one machine) resolves to."""
    return {
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [endpoint(t) for t in target.split(",") if t.strip()]}
            ],
        },
    }


def service_cluster(name: str, target: str, interval: float, lb: str = "round_robin") -> dict[str, Any]:
    cluster = grpc_cluster(name, target)
    cluster["dns_lookup_family"] = "V4_ONLY"
    cluster["health_checks"] = [
        {
            "timeout": "1s",
            "interval": f"{interval}s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "no_traffic_interval": f"{interval}s",
            "grpc_health_check": {},
        }
    ]
    if lb != "round_robin":
        # STRICT_DNS makes each resolved address a host; a ring of them survives membership changes.
        cluster["lb_policy"] = INFERENCE_LB_POLICIES[lb]
    return cluster


def websocket_cluster(target: str, interval: float) -> dict[str, Any]:
    """The session replicas' WebSocket bridges: plain HTTP/1.1, health-checked at /healthz."""
    return {
        "name": WEBSOCKET_CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_ONLY",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": WEBSOCKET_CLUSTER,
                            "endpoints": [{"lb_endpoints": [endpoint(t) for t in target.split(",") if t.strip()]}]},
        "health_checks": [{"timeout": "1s", "interval": f"{interval}s", "unhealthy_threshold": 2,
                           "healthy_threshold": 1, "no_traffic_interval": f"{interval}s",
                           "http_health_check": {"path": "/healthz"}}],
    }


def tracing(collector: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Envoy's OpenTelemetry tracer: a span per request, exported to `collector`, whose context it
    sends upstream as traceparent, so the services' spans join Envoy's trace (an incoming
    traceparent is continued). Without it Envoy forwards a client's traceparent header untouched."""
    cluster = grpc_cluster("otlp_collector", collector)
    tracing = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otlp_collector"}, "timeout": "1s"},
                "service_name": "parley-gateway",
            },
        },
    }
    return tracing, cluster
