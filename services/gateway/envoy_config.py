"""Generates Envoy's configuration — the same generator serves `make run`, the tests and the
Kubernetes ConfigMap; only the settings differ.

    python -m services.gateway.envoy_config --out build/envoy.yaml

What the config does:
- grpc_json_transcoder: REST/JSON <-> gRPC from the descriptor set, snake_case JSON, every scalar
  printed, server streams as SSE, gRPC errors as JSON bodies with the matching HTTP status, and 404
  for a path no RPC binds.
- CORS for PARLEY_CORS_ORIGINS; same-origin only when it is empty.
- routes by gRPC method: streaming RPCs have no timeout, unary ones a bounded one. Internal services
  (credential verification, response cache, rate limits) are not routed at all.
- the PWA (web/) at / from direct responses (services/gateway/web_app.py).
- GET /v1/openapi.json: the OpenAPI document generated from the same protos (tools/openapi.py).
- GET /healthz: 200 only when every upstream answers grpc.health.v1 SERVING; 503 naming the others.
- errors on the OpenAI-compatible paths are rewritten into OpenAI's {"error": {...}} JSON.
- active gRPC health checks of each upstream, a JSON access log on stdout, admin on loopback only.
- optionally (PARLEY_OTLP_COLLECTOR) OpenTelemetry tracing: Envoy's span heads each request's trace.
- GET /v1/sessions/{id}:connect upgraded to a WebSocket and proxied to the session service's
  WebSocket bridge (services/session/websocket.py, PARLEY_SESSION_WEBSOCKET_TARGET): the only
  route where upgrades are allowed, with the transcoder off and no timeout (the bridge closes idle
  sockets itself).
- optionally (PARLEY_INFERENCE_LB=ring_hash or maglev, as on Kubernetes) session affinity for
  inference: every address the inference target resolves to (a headless Service) is a host, and a
  consistent hash of the x-parley-session-id header picks one, so a conversation returns to the
  replica that holds its KV cache and a replica that leaves only remaps its own share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import string
from pathlib import Path
from typing import Any

from services.core import config
from services.core.config import setting
from services.gateway import clusters, web_app
from services.gateway.clusters import INFERENCE_LB_POLICIES, WEBSOCKET_CLUSTER
from services.wire.status import ANTHROPIC_ERROR_TYPES

SERVICES = ("auth", "session", "cache", "inference")

# gRPC services the gateway exposes (REST and native gRPC); internal ones are deliberately absent.
PUBLIC_SERVICES = {
    "auth": ("parley.auth.v1.AuthService",),
    "session": ("parley.session.v1.SessionService",),
    "cache": ("parley.cache.v1.CacheService",),
    "inference": ("parley.inference.v1.InferenceService",),
}

# Server-streaming methods: they may run as long as generation does.
STREAMING_METHODS = {
    "session": ("/parley.session.v1.SessionService/Chat", "/parley.session.v1.SessionService/CreateResponse"),
    "inference": (
        "/parley.inference.v1.InferenceService/Generate",
        "/parley.inference.v1.InferenceService/CreateChatCompletion",
        "/parley.inference.v1.InferenceService/CreateCompletion",
        "/parley.inference.v1.InferenceService/CreateMessage",
    ),
}

# Set by the session service on its inference calls; the consistent hash key for inference.
SESSION_HASH_HEADER = "x-parley-session-id"

# Errors on these paths take OpenAI's {"error": {...}} shape (the Lua filter; tools/openapi.py
# documents them so).
OPENAI_PATH_PREFIXES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses")
# Errors on these paths take Anthropic's {"type": "error", "error": {...}} shape; so do those of the
# OpenAI paths (GET /v1/models) for a request that sends ANTHROPIC_VERSION_HEADER, as Anthropic's SDKs do.
ANTHROPIC_PATH_PREFIXES = ("/v1/messages",)
ANTHROPIC_VERSION_HEADER = "anthropic-version"

UNARY_TIMEOUT = {"auth": "30s", "session": "30s", "cache": "10s", "inference": "600s"}  # loads are slow

# Local replies (Envoy's own 404/503/504…) get the same JSON shape as transcoded gRPC errors.
LOCAL_REPLY_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 429: 8, 503: 14, 504: 4}

GATEWAY_LUA = Path(__file__).with_name("gateway.lua")


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    http_host: str = setting("127.0.0.1", help="address Envoy listens on")
    http_port: int = setting(8080, min=0, max=65535)
    admin_port: int = setting(9901, min=0, max=65535, help="Envoy admin, always on 127.0.0.1")
    cors_origins: tuple[str, ...] = setting((), help="comma-separated origins allowed by CORS")
    descriptor_path: Path = setting(Path("build/parley.pb"))
    openapi_path: Path = setting(Path("build/openapi.json"),
                                 help="the OpenAPI document served at /v1/openapi.json (tools/gen.py writes it)")
    web_dir: Path = setting(web_app.SOURCE, help="the PWA's files, served at / (web/ of the repo)")
    health_check_interval_seconds: float = setting(2.0, min=0.1)
    inference_lb: str = setting("round_robin", choices=tuple(INFERENCE_LB_POLICIES),
                                help=f"ring_hash or maglev: consistent hash on {SESSION_HASH_HEADER}")
    otlp_collector: str = setting("", help="host:port of an OTLP/gRPC collector: Envoy traces requests there")
    max_request_bytes: int = setting(
        1024 * 1024, min=1024, max=64 * 1024 * 1024,
        help="largest request body the gateway accepts (413 beyond; also the buffer per connection)")


def _routes(hash_inference: bool = False) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = [
        # Answered by the Lua filter before routing; the route only has to exist.
        {"match": {"path": "/healthz"}, "route": {"cluster": "auth"}},
    ]
    for service, paths in STREAMING_METHODS.items():
        for path in paths:
            routes.append({"match": {"path": path}, "route": {"cluster": service, "timeout": "0s"}})
    for service, names in PUBLIC_SERVICES.items():
        for name in names:
            routes.append(
                {"match": {"prefix": f"/{name}/"}, "route": {"cluster": service, "timeout": UNARY_TIMEOUT[service]}}
            )
    for route in routes:
        # A replica that died a moment ago (before health checks notice) is tried, fails to connect,
        # and another takes the request: retried only when the request never reached a service.
        route["route"]["retry_policy"] = {"retry_on": "connect-failure,refused-stream,reset-before-request",
                                          "num_retries": 2}
        # Every API answer is someone's own and changes: tokens, keys, conversations. No cache keeps it.
        route["response_headers_to_add"] = [{"header": {"key": "cache-control", "value": "no-store"},
                                             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    if hash_inference:
        # Requests without the header (e.g. OpenAI clients) get a random replica.
        for route in routes:
            if route["route"]["cluster"] == "inference":
                route["route"]["hash_policy"] = [{"header": {"header_name": SESSION_HASH_HEADER}}]
    return [_upgrade_refusal()] + routes


def _upgrade_refusal() -> dict[str, Any]:
    """A protocol upgrade (WebSocket) of a transcoded request is 400: gRPC cannot take one, and its
    upstream answered 500 ("Error parsing ':method' metadata"). It matches the gRPC path the
    transcoder made of the request; a WebSocket route of its own keeps its own path."""
    return {
        "name": "refuse-upgrade",
        "match": {"prefix": "/parley.", "headers": [{"name": "upgrade", "present_match": True}]},
        "direct_response": {"status": 400, "body": {"inline_string": "this path does not take a protocol upgrade "
                                                                      "(WebSocket)"}},
    }


OPENAPI_PATH = "/v1/openapi.json"


def _openapi_route(document: Path) -> dict[str, Any]:
    """GET /v1/openapi.json: the OpenAPI document tools/openapi.py made from the same descriptor set
    (tools/gen.py writes both), read by Envoy at start; no credential needed."""
    headers = {"content-type": "application/json", "cache-control": "no-cache", "x-content-type-options": "nosniff"}
    return {
        "name": "openapi",
        "match": {"path": OPENAPI_PATH, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "direct_response": {"status": 200, "body": {"filename": str(document)}},
        "response_headers_to_add": [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                                    for k, v in headers.items()],
        "typed_per_filter_config": {"envoy.filters.http.grpc_json_transcoder": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}},
    }


# The WebSocket route's path (the query string is not part of what it matches).
WEBSOCKET_PATH_REGEX = "^/v1/sessions/[^/:]+:connect$"


def _websocket_route() -> dict[str, Any]:
    return {
        "name": "session:connect",
        "match": {"safe_regex": {"regex": WEBSOCKET_PATH_REGEX}},
        "route": {"cluster": WEBSOCKET_CLUSTER, "timeout": "0s", "idle_timeout": "0s",
                  "upgrade_configs": [{"upgrade_type": "websocket"}]},
        "typed_per_filter_config": {
            "envoy.filters.http.grpc_json_transcoder": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}},
    }


def _cors(origins: tuple[str, ...]) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in origins],
        "allow_methods": "GET, POST, PATCH, DELETE, OPTIONS",
        "allow_headers": "authorization, content-type, x-request-id, traceparent, tracestate, x-grpc-web, grpc-timeout, "
                         "x-api-key, anthropic-version, anthropic-beta",
        "expose_headers": "retry-after, x-request-id, x-parley-cache, parley-reason, grpc-status, grpc-message",
        "max_age": "600",
    }


def _local_reply_config() -> dict[str, Any]:
    not_healthz = {
        "header_filter": {"header": {"name": ":path", "string_match": {"exact": "/healthz"}, "invert_match": True}}
    }
    mappers = []
    for http_status, grpc_code in LOCAL_REPLY_GRPC_CODES.items():
        mappers.append(
            {
                "filter": {
                    "and_filter": {
                        "filters": [
                            {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": http_status, "runtime_key": f"parley.local_reply.{http_status}"}}}},
                            not_healthz,
                        ]
                    }
                },
                "body_format_override": {
                    "json_format": {"code": grpc_code, "message": "%LOCAL_REPLY_BODY%"},
                    "content_type": "application/json",
                },
            }
        )
    return {"mappers": mappers}


ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "service": "gateway",
}


def _lua(gateway: GatewaySettings) -> str:
    """The gateway's Lua filter (gateway.lua) with its ${NAME} placeholders filled in."""
    lua = string.Template(GATEWAY_LUA.read_text()).safe_substitute(
        CLUSTERS_LIST=", ".join(f'"{s}"' for s in SERVICES),
        OPENAI_PREFIX_LIST=", ".join(f'"{p}"' for p in OPENAI_PATH_PREFIXES),
        ANTHROPIC_PREFIX_LIST=", ".join(f'"{p}"' for p in ANTHROPIC_PATH_PREFIXES),
        ANTHROPIC_TYPE_TABLE=", ".join(f'["{k}"] = "{v}"' for k, v in ANTHROPIC_ERROR_TYPES.items()),
        MAX_BODY_BYTES_VALUE=gateway.max_request_bytes, ANTHROPIC_VERSION_HEADER=ANTHROPIC_VERSION_HEADER)
    if "${" in lua:
        raise RuntimeError("gateway.lua names a placeholder that envoy_config.py does not fill")
    return lua


def _http_filters(lua: str, descriptor: str) -> list[dict[str, Any]]:
    """CORS, the gateway's Lua filter, gRPC-JSON transcoding, then the router."""
    return [
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
        },
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": lua},
            },
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                "proto_descriptor": descriptor,
                "services": [name for names in PUBLIC_SERVICES.values() for name in names],
                "print_options": {
                    "add_whitespace": False,
                    "always_print_primitive_fields": True,
                    "always_print_enums_as_ints": False,
                    "preserve_proto_field_names": True,
                    "stream_sse_style_delimited": True,
                },
                "convert_grpc_status": True,
                "case_insensitive_enum_parsing": True,
                "request_validation_options": {"reject_unknown_method": True},
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _connection_manager(gateway: GatewaySettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The HTTP connection manager (routes, filters, logs, tracing) and the clusters its tracing needs."""
    routes = [_openapi_route(gateway.openapi_path.resolve()), *web_app.routes(gateway.web_dir.resolve()),
              _websocket_route(), *_routes(gateway.inference_lb != "round_robin")]
    virtual_host: dict[str, Any] = {"name": "parley", "domains": ["*"], "routes": routes}
    if gateway.cors_origins:
        virtual_host["typed_per_filter_config"] = {"envoy.filters.http.cors": _cors(gateway.cors_origins)}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "parley",
        "codec_type": "AUTO",
        "generate_request_id": True,
        # Envoy appends the real peer to x-forwarded-for; auth trusts only that last address.
        "use_remote_address": True,
        # Without this a client waits ~1 s for the close when an upstream dies mid-stream.
        "delayed_close_timeout": "0s",
        # WebSocket upgrades only where a route enables them (_websocket_route).
        "upgrade_configs": [{"upgrade_type": "websocket", "enabled": False}],
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ],
        "local_reply_config": _local_reply_config(),
        "route_config": {"name": "parley", "virtual_hosts": [virtual_host],
                         "max_direct_response_body_size_bytes": web_app.MAX_BODY_BYTES,
                         # Browsers take a reply's content type as given; Envoy's timing header says
                         # nothing a client needs.
                         "response_headers_to_add": [{"header": {"key": "x-content-type-options", "value": "nosniff"},
                                                      "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                         "response_headers_to_remove": ["x-envoy-upstream-service-time"]},
        # No "server: envoy" on every reply.
        "server_header_transformation": "PASS_THROUGH",
        "http_filters": _http_filters(_lua(gateway), str(gateway.descriptor_path.resolve())),
    }
    tracing_clusters = []
    if gateway.otlp_collector:
        hcm["tracing"], otlp_cluster = clusters.tracing(gateway.otlp_collector)
        tracing_clusters.append(otlp_cluster)
    return hcm, tracing_clusters


def build(gateway: GatewaySettings, common: config.CommonSettings) -> dict[str, Any]:
    hcm, tracing_clusters = _connection_manager(gateway)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": gateway.admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {"socket_address": {"address": gateway.http_host, "port_value": gateway.http_port}},
                    # What a buffered body (an HttpBody request, a Lua-read error) may reach: the same limit.
                    "per_connection_buffer_limit_bytes": gateway.max_request_bytes,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                clusters.service_cluster(s, common.target_of(s), gateway.health_check_interval_seconds,
                         gateway.inference_lb if s == "inference" else "round_robin")
                for s in SERVICES
            ] + [clusters.websocket_cluster(common.target_of("session_websocket"), gateway.health_check_interval_seconds)]
            + tracing_clusters,
        },
    }


def render(gateway: GatewaySettings, common: config.CommonSettings) -> str:
    # JSON is valid YAML; no YAML library needed.
    return json.dumps(build(gateway, common), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        text = render(config.load(GatewaySettings), config.load(config.CommonSettings))
    except config.ConfigError as exc:
        raise SystemExit(f"gateway: configuration error: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
