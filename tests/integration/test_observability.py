"""Observability through Envoy with the real model: one chat turn is one trace across the gateway,
session, cache and inference (collected by an in-test OTLP/gRPC receiver); Prometheus metrics move
with traffic; log lines carry the trace; the admin summary."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.stack import Stack
from tests.integration.chat import create_session, iter_events
from tests.integration.conftest import ADMIN_PASSWORD, Caller, new_user, sign_in, start_stack

MODEL = "smollm2-135m-instruct"
SERVICES = ("parley-gateway", "parley-session", "parley-cache", "parley-inference")
SERVER, CLIENT = 2, 3


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int  # OTLP: 2 server, 3 client
    attributes: dict[str, Any]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span in memory."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the gRPC method's name
        received = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    received.append(Span(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                         s.parent_span_id.hex(), s.kind, attributes))
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, collector: tuple[Collector, int]) -> Iterator[Stack]:
    """A stack of its own whose services and Envoy export spans to the collector."""
    _, port = collector
    running = start_stack(
        tmp_path_factory.mktemp("traced"),
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_BSP_SCHEDULE_DELAY="200",  # export within a fifth of a second
        PARLEY_OTLP_COLLECTOR=f"127.0.0.1:{port}",
        PARLEY_PARALLEL_SLOTS="1",
        PARLEY_CONTEXT_LENGTH="2048",
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def person(traced: Stack) -> Caller:
    return new_user(traced.url, "obs")


@pytest.fixture(scope="module")
def chat_turn(traced: Stack, person: Caller) -> dict[str, str]:
    """One chat turn through Envoy that arrives with the caller's own traceparent."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    marker = f"zebra-{uuid.uuid4().hex[:6]}"  # a word of the message, to look for in the logs
    with httpx.Client(base_url=traced.url, timeout=120) as http:
        sid = create_session(http, person, model=MODEL)["id"]
        headers = {**person.headers, "traceparent": f"00-{trace_id}-{parent_id}-01"}
        with http.stream("POST", f"/v1/sessions/{sid}:chat", headers=headers,
                         json={"content": f"Say hello to {marker}.", "sampling": {"max_tokens": 8}}) as response:
            assert response.status_code == 200
            events = list(iter_events(response))
    assert "done" in events[-1], events[-1]
    return {"trace_id": trace_id, "parent_id": parent_id, "marker": marker, "session_id": sid}


def wait_for_trace(receiver: Collector, trace_id: str, services: tuple[str, ...], timeout: float = 20.0) -> list[Span]:
    # Envoy flushes its spans every 5 s; the services within OTEL_BSP_SCHEDULE_DELAY.
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.trace(trace_id)
        if {s.service for s in spans} >= set(services) or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def test_one_chat_turn_is_one_trace_from_envoy_to_inference(collector, chat_turn) -> None:
    receiver, _ = collector
    spans = wait_for_trace(receiver, chat_turn["trace_id"], SERVICES)
    assert {s.service for s in spans} >= set(SERVICES), sorted({(s.service, s.name) for s in spans})
    by_id = {s.span_id: s for s in spans}

    # Envoy continued the caller's trace; every other span hangs off a span of the same trace.
    roots = [s for s in spans if s.parent_id not in by_id]
    assert {(s.service, s.parent_id) for s in roots} == {("parley-gateway", chat_turn["parent_id"])}

    def parent(span: Span) -> Span:
        return by_id[span.parent_id]

    def one(service: str, name: str, kind: int = SERVER) -> Span:
        found = [s for s in spans if s.service == service and s.name == name and s.kind == kind]
        assert len(found) == 1, (service, name, sorted((s.service, s.name) for s in spans))
        return found[0]

    chat = one("parley-session", "parley.session.v1.SessionService/Chat")
    assert parent(chat).service == "parley-gateway"
    assert chat.attributes["rpc.system"] == "grpc" and chat.attributes["rpc.grpc.status_code"] == 0

    # session -> inference: one call per turn, and the generation inside it with its GenAI attributes.
    generate = one("parley-inference", "parley.inference.v1.InferenceService/Generate")
    assert parent(generate) is one("parley-session", generate.name, CLIENT)
    assert parent(parent(generate)) is chat
    assert [s.name for s in spans if s.service == "parley-session" and s.kind == CLIENT
            and "InferenceService" in s.name] == [generate.name]

    # inference -> cache (the rate limit, the lookup): inference's client span is the parent of the
    # cache's server span.
    cache_calls = [s for s in spans if s.service == "parley-cache" and s.kind == SERVER]
    assert cache_calls
    for server_span in cache_calls:
        client = parent(server_span)
        assert (client.service, client.name, client.kind) == ("parley-inference", server_span.name, CLIENT)
        assert parent(client) is generate
    generation = one("parley-inference", f"chat {MODEL}", kind=1)  # INTERNAL
    assert parent(generation) is generate
    assert generation.attributes["gen_ai.request.model"] == MODEL
    assert generation.attributes["gen_ai.usage.input_tokens"] > 0
    assert 0 < generation.attributes["gen_ai.usage.output_tokens"] <= 8
    assert generation.attributes["gen_ai.server.time_to_first_token"] > 0
    assert generation.attributes["gen_ai.response.finish_reasons"] in (["stop"], ["length"])


def test_log_lines_of_the_turn_carry_its_trace_and_request_id(traced: Stack, chat_turn) -> None:
    trace_id = chat_turn["trace_id"]
    lines: dict[str, list[dict]] = {}
    for name in ("session", "cache", "inference"):
        for raw in Path(traced.log_dir, f"{name}.log").read_text().splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("trace_id") == trace_id:
                lines.setdefault(name, []).append(entry)
    assert set(lines) == {"session", "cache", "inference"}, set(lines)
    for name, entries in lines.items():
        for entry in entries:
            assert entry["service"] == name and entry["level"] and entry["time"]
            assert len(entry["span_id"]) == 16
    rpc = [e for e in lines["inference"] if e["message"] == "rpc"]
    assert "/parley.inference.v1.InferenceService/Generate" in [e["method"] for e in rpc]
    # Envoy's request id reaches every service that the turn touched: the one in its access log line.
    request_ids = {entry.get("request_id") for entries in lines.values() for entry in entries}
    (request_id,) = request_ids
    deadline = time.monotonic() + 15  # Envoy flushes its access log every few seconds
    while True:
        access = [json.loads(raw) for raw in Path(traced.log_dir, "gateway.log").read_text().splitlines()
                  if '"request_id"' in raw and request_id in raw]
        if access or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [a["path"] for a in access] == [f"/v1/sessions/{chat_turn['session_id']}:chat"]
    # Message contents never reach the logs.
    for name in ("gateway", "auth", "session", "cache", "inference"):
        assert chat_turn["marker"] not in Path(traced.log_dir, f"{name}.log").read_text()


def scrape(port: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_inference_metrics_move_with_a_chat_completion(traced: Stack, person: Caller) -> None:
    port = traced.env["PARLEY_INFERENCE_METRICS_PORT"]
    model = (("model", MODEL),)
    before = scrape(port)
    with httpx.Client(base_url=traced.url, timeout=120) as http:
        answer = http.post("/v1/chat/completions", headers=person.headers, json={
            "model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "Name a colour."}]})
    assert answer.status_code == 200, answer.text
    generated = answer.json()["usage"]["completion_tokens"]
    after = scrape(port)

    ttft = "parley_inference_time_to_first_token_seconds_count"
    assert after[(ttft, model)] == before.get((ttft, model), 0) + 1
    tokens = "parley_inference_generated_tokens_total"
    assert after[(tokens, model)] == before.get((tokens, model), 0) + generated > 0
    assert after[("parley_inference_loaded_models", ())] == 1
    assert after[("parley_inference_model_memory_bytes", model)] > 50 * 2**20
    rpc = ("parley_rpc_server_requests_total", (("grpc_code", "OK"), ("grpc_method", "CreateChatCompletion"),
                                                ("grpc_service", "parley.inference.v1.InferenceService")))
    assert after[rpc] == before.get(rpc, 0) + 1


def test_an_answer_that_copies_its_prompt_is_drafted_and_the_drafts_are_counted(traced: Stack, person: Caller) -> None:
    """Speculative decoding (on by default): a greedy answer repeating a paragraph of its prompt has
    n-gram drafts accepted, and parley_inference_draft_tokens_total shows it."""
    port = traced.env["PARLEY_INFERENCE_METRICS_PORT"]
    accepted = ("parley_inference_draft_tokens_total", (("model", MODEL), ("outcome", "accepted")))
    before = scrape(port).get(accepted, 0)
    paragraph = ("The harbour master walked the length of the pier before dawn, counting the boats tied along it. "
                 "Gulls followed the fishing fleet out past the breakwater, calling over the grey and restless water.")
    with httpx.Client(base_url=traced.url, timeout=120) as http:
        answer = http.post("/v1/chat/completions", headers=person.headers, json={
            "model": MODEL, "max_tokens": 60, "temperature": 0,
            "messages": [{"role": "user", "content": f"Copy this paragraph exactly, word for word:\n\n{paragraph}"}]})
    assert answer.status_code == 200, answer.text
    assert "counting the boats tied along it" in answer.json()["choices"][0]["message"]["content"]
    assert scrape(port)[accepted] >= before + 10


def test_every_service_serves_metrics_and_auth_counts_failed_logins(traced: Stack) -> None:
    for name in ("auth", "session", "cache", "inference"):
        assert "parley_rpc_server_requests_total" in httpx.get(
            f"http://127.0.0.1:{traced.env[f'PARLEY_{name.upper()}_METRICS_PORT']}/metrics", timeout=10).text
    port = traced.env["PARLEY_AUTH_METRICS_PORT"]
    failures = ("parley_auth_login_failures_total", ())
    before = scrape(port).get(failures, 0)
    answer = httpx.post(f"{traced.url}/v1/auth/login", json={"username": "nobody", "password": "wrong-password-1"})
    assert answer.status_code == 401
    assert scrape(port)[failures] == before + 1


def test_admin_metrics_summary(traced: Stack, person: Caller, chat_turn) -> None:
    with httpx.Client(base_url=traced.url, timeout=30) as http:
        assert http.get("/v1/admin/metrics", headers=person.headers).status_code == 403
        assert http.get("/v1/admin/metrics").status_code == 401
        admin = sign_in(traced.url, "admin", ADMIN_PASSWORD)
        answer = http.get("/v1/admin/metrics", headers=admin.headers)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    summary = answer.json()
    assert int(summary["requests_total"]) >= 1
    assert 0 < summary["time_to_first_token_p50_ms"] <= summary["time_to_first_token_p95_ms"]
    assert summary["tokens_per_second"] > 0
    assert summary["cache_available"] is True and 0 <= summary["cache_hit_ratio"] <= 1
    assert summary["loaded_models"] == [{"id": MODEL, "memory_mib": summary["loaded_models"][0]["memory_mib"]}]
    assert summary["loaded_models"][0]["memory_mib"] > 50
    assert summary["running_requests"] == 0 and summary["queued_requests"] == 0


def test_without_envoy_tracing_a_clients_traceparent_is_continued(stack: Stack, user: Caller) -> None:
    """The shared stack exports nothing and Envoy does not trace: the services still continue the
    caller's trace, as their log lines show."""
    trace_id = secrets.token_hex(16)
    headers = {**user.headers, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    answer = httpx.post(f"{stack.url}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200, answer.text

    def rpc_lines() -> list[dict[str, Any]]:
        return [entry for entry in (json.loads(raw) for raw in Path(stack.log_dir, "inference.log").read_text().splitlines()
                                    if trace_id in raw) if entry["message"] == "rpc"]

    # The rpc line is written once the call has ended, which can be just after the client has the answer.
    deadline = time.monotonic() + 5
    while not rpc_lines() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e["message"], e["method"]) for e in rpc_lines()] == [
        ("rpc", "/parley.inference.v1.InferenceService/CreateChatCompletion")]
