"""Inference telemetry with the real bundled model: the GenAI span of a generation, TTFT, token and
inter-token series, registry gauges and the admin summary."""

from __future__ import annotations

from pathlib import Path

from opentelemetry import trace
from prometheus_client import REGISTRY

from services.inference import metrics
from tests.unit import spans as captured
from tests.unit.inference.test_registry_and_engine import MODEL, collect, make_registry


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_generation_has_a_genai_span_and_its_metrics(tmp_path: Path) -> None:
    exporter = captured.exporter()
    registry, generation = make_registry(tmp_path)
    metrics.REGISTRY_GAUGES.watch(registry.loaded)
    loads_before = sample("parley_inference_model_load_duration_seconds_count", model=MODEL)
    ttft_before = sample("parley_inference_time_to_first_token_seconds_count", model=MODEL)
    tokens_before = sample("parley_inference_generated_tokens_total", model=MODEL)
    gaps_before = sample("parley_inference_inter_token_latency_seconds_count", model=MODEL)
    ended_before = sample("parley_inference_generations_total", model=MODEL, finish_reason="length")
    exporter.clear()

    _, last = await collect(generation, MODEL, "Count to ten.", max_tokens=6, temperature=0)
    usage = last.usage
    assert last.finish_reason == "length" and usage.completion_tokens == 6

    (span,) = captured.named(exporter.get_finished_spans(), f"chat {MODEL}")
    assert span.kind == trace.SpanKind.INTERNAL
    attributes = dict(span.attributes)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == MODEL
    assert attributes["gen_ai.request.max_tokens"] == 6 and attributes["gen_ai.request.temperature"] == 0
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == 6
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["gen_ai.server.time_to_first_token"] > 0

    assert sample("parley_inference_model_load_duration_seconds_count", model=MODEL) == loads_before + 1
    assert sample("parley_inference_time_to_first_token_seconds_count", model=MODEL) == ttft_before + 1
    assert sample("parley_inference_generated_tokens_total", model=MODEL) == tokens_before + 6
    assert sample("parley_inference_inter_token_latency_seconds_count", model=MODEL) == gaps_before + 5
    assert sample("parley_inference_generations_total", model=MODEL, finish_reason="length") == ended_before + 1

    # Gauges read from the registry at scrape time.
    assert sample("parley_inference_loaded_models") == 1
    assert sample("parley_inference_model_memory_bytes", model=MODEL) > 50 * 2**20
    assert sample("parley_inference_running_requests", model=MODEL) == 0
    assert sample("parley_inference_queue_depth", model=MODEL) == 0

    summary = metrics.RECENT.summary()
    assert summary.requests_total >= 1 and 0 < summary.ttft_p50_seconds <= summary.ttft_p95_seconds
    assert summary.tokens_per_second > 0
    await registry.close()
    assert sample("parley_inference_loaded_models") == 0


async def test_a_failed_generation_is_an_error_span(tmp_path: Path) -> None:
    exporter = captured.exporter()
    registry, generation = make_registry(tmp_path)
    before = sample("parley_inference_generations_total", model=MODEL, finish_reason="error")
    exporter.clear()
    try:
        await collect(generation, MODEL, "Hi", temperature=5)
    except Exception:  # noqa: BLE001 - InvalidArgument, checked through the span
        pass
    (span,) = captured.named(exporter.get_finished_spans(), f"chat {MODEL}")
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.attributes["error.type"] == "InvalidArgument"
    assert sample("parley_inference_generations_total", model=MODEL, finish_reason="error") == before + 1
    await registry.close()


def test_summary_percentiles_over_the_recent_window() -> None:
    window = metrics.RecentGenerations(size=100)
    assert window.summary() == metrics.Summary(0, 0.0, 0.0, 0.0)
    for i in range(1, 101):
        window.ended()
        window.add(ttft_seconds=i / 1000, tokens=11, decode_seconds=0.5)
    summary = window.summary()
    assert summary.requests_total == 100
    assert abs(summary.ttft_p50_seconds - 0.0505) < 1e-9 and abs(summary.ttft_p95_seconds - 0.09505) < 1e-9
    assert summary.tokens_per_second == 20.0  # 10 tokens after the first in 0.5 s
