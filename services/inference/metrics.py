"""Inference telemetry: Prometheus series, the GenAI span of each generation, and the recent-generation
window behind the admin summary (GET /v1/admin/metrics).

Series (all labelled by model id):
- parley_inference_time_to_first_token_seconds (histogram): request arrival to first sampled token,
  queueing and prompt evaluation included — what a user waits before text starts.
- parley_inference_inter_token_latency_seconds (histogram): time between consecutive output tokens.
- parley_inference_generated_tokens_total, parley_inference_prompt_tokens_total (counters).
- parley_inference_generations_total{finish_reason} (counter): stop, length, cancelled, error.
- parley_inference_model_load_duration_seconds (histogram).
- parley_inference_draft_tokens_total{outcome} (counter): speculative draft tokens (engines.speculation)
  verified, accepted or rejected; accepted / (accepted + rejected) is the drafts' acceptance rate.
- embeddings: parley_inference_embedding_requests_total{outcome} (ok, error), _inputs_total and
  _tokens_total (counters), parley_inference_embedding_duration_seconds (histogram: arrival to the
  last vector, queueing included).
- remote engines: parley_inference_upstream_requests_total{upstream, outcome} and
  parley_inference_upstream_failures_total{upstream} (counters); each upstream call is a CLIENT span.
- read at scrape time from the registry: parley_inference_queue_depth (requests waiting for the engine),
  parley_inference_running_requests, parley_inference_loaded_models, parley_inference_model_memory_bytes.

Span names and attributes follow the OpenTelemetry GenAI semantic conventions ("chat <model>",
"embeddings <model>", gen_ai.*); the model runs in this process, so the span kind is INTERNAL.
"""

from __future__ import annotations

import collections
import statistics
import time
import weakref
from collections.abc import Iterator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.core import telemetry
from services.core.sampling import SamplingInput

TTFT = prometheus_client.Histogram(
    "parley_inference_time_to_first_token_seconds", "Request arrival to the first sampled token", ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
INTER_TOKEN = prometheus_client.Histogram(
    "parley_inference_inter_token_latency_seconds", "Time between consecutive output tokens", ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0),
)
GENERATED_TOKENS = prometheus_client.Counter(
    "parley_inference_generated_tokens_total", "Output tokens sampled", ["model"])
PROMPT_TOKENS = prometheus_client.Counter(
    "parley_inference_prompt_tokens_total", "Prompt tokens of finished generations", ["model"])
GENERATIONS = prometheus_client.Counter(
    "parley_inference_generations_total", "Generations ended, by finish reason (stop, length, cancelled, error)",
    ["model", "finish_reason"])
MODEL_LOAD = prometheus_client.Histogram(
    "parley_inference_model_load_duration_seconds", "Time to load a model into memory", ["model"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0),
)
DRAFT_TOKENS = prometheus_client.Counter(
    "parley_inference_draft_tokens_total", "Speculative draft tokens verified, by outcome (accepted, rejected)",
    ["model", "outcome"])
EMBEDDING_REQUESTS = prometheus_client.Counter(
    "parley_inference_embedding_requests_total", "Embedding requests ended, by outcome (ok, error)",
    ["model", "outcome"])
EMBEDDING_INPUTS = prometheus_client.Counter(
    "parley_inference_embedding_inputs_total", "Inputs embedded", ["model"])
EMBEDDING_TOKENS = prometheus_client.Counter(
    "parley_inference_embedding_tokens_total", "Tokens of the inputs embedded", ["model"])
EMBEDDING_LATENCY = prometheus_client.Histogram(
    "parley_inference_embedding_duration_seconds", "Embedding request arrival to its last vector", ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
# Remote engines (services.inference.engines.upstream): each upstream call, by model, upstream and outcome
# (ok, cancelled, deadline, cut, unreachable, error or the upstream's HTTP status), and upstreams
# marked failed (a health check or a request that could not connect).
UPSTREAM_REQUESTS = prometheus_client.Counter(
    "parley_inference_upstream_requests_total", "Calls to a remote model's upstream, by outcome",
    ["model", "upstream", "outcome"])
UPSTREAM_FAILURES = prometheus_client.Counter(
    "parley_inference_upstream_failures_total", "Times an upstream was found failed", ["model", "upstream"])


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model's figures at scrape time."""

    model: str
    waiting: int
    running: int
    memory_mib: int


class RegistryCollector(Collector):
    """Gauges read from the models in memory when Prometheus scrapes (the source is the model
    registry's `loaded`, held weakly so that a closed registry goes away)."""

    def __init__(self) -> None:
        self._source: weakref.WeakMethod[Callable[[], Iterable[LoadedModel]]] | None = None

    def watch(self, source: Callable[[], Iterable[LoadedModel]]) -> None:
        self._source = weakref.WeakMethod(source)  # type: ignore[arg-type]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily("parley_inference_queue_depth", "Requests waiting for room in the engine", labels=["model"])
        running = GaugeMetricFamily("parley_inference_running_requests", "Generations running", labels=["model"])
        memory = GaugeMetricFamily("parley_inference_model_memory_bytes", "Memory held by a loaded model", labels=["model"])
        loaded = GaugeMetricFamily("parley_inference_loaded_models", "Models in memory")
        source = self._source() if self._source is not None else None
        models = list(source()) if source is not None else []
        for m in models:
            queued.add_metric([m.model], m.waiting)
            running.add_metric([m.model], m.running)
            memory.add_metric([m.model], m.memory_mib * 2**20)
        loaded.add_metric([], len(models))
        yield from (queued, running, memory, loaded)


REGISTRY_GAUGES = RegistryCollector()
prometheus_client.REGISTRY.register(REGISTRY_GAUGES)


@dataclass(frozen=True)
class Summary:
    requests_total: int
    ttft_p50_seconds: float
    ttft_p95_seconds: float
    tokens_per_second: float


class RecentGenerations:
    """The last `size` finished generations, for exact percentiles (Prometheus buckets are coarse)."""

    def __init__(self, size: int = 1000) -> None:
        self._samples: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=size)
        self.total = 0

    def ended(self) -> None:
        self.total += 1

    def add(self, ttft_seconds: float, tokens: int, decode_seconds: float) -> None:
        self._samples.append((ttft_seconds, tokens, decode_seconds))

    def summary(self) -> Summary:
        ttfts = sorted(s[0] for s in self._samples)
        p50 = p95 = 0.0
        if len(ttfts) == 1:
            p50 = p95 = ttfts[0]
        elif ttfts:
            cuts = statistics.quantiles(ttfts, n=20, method="inclusive")
            p50, p95 = cuts[9], cuts[18]
        # Decode speed: tokens after the first over the time they took, across the window.
        decoded = [(tokens - 1, seconds) for _, tokens, seconds in self._samples if tokens > 1 and seconds > 0]
        seconds = sum(s for _, s in decoded)
        return Summary(self.total, p50, p95, sum(t for t, _ in decoded) / seconds if seconds else 0.0)


RECENT = RecentGenerations()


class GenerationTelemetry:
    """The GenAI span and the metrics of one generation; fed each chunk, then ended once."""

    def __init__(self, model_id: str, chat: bool, given: SamplingInput) -> None:
        self.started = time.monotonic()
        self.model = model_id
        self.operation = "chat" if chat else "text_completion"
        self.outcome = "cancelled"  # until a final chunk or an error says otherwise
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.provider.name": "parley",
            "gen_ai.request.model": model_id,
        }
        for name, value in (("max_tokens", given.max_tokens), ("temperature", given.temperature),
                            ("top_p", given.top_p), ("top_k", given.top_k), ("seed", given.seed)):
            if value is not None:
                attributes[f"gen_ai.request.{name}"] = value
        if given.stop:
            attributes["gen_ai.request.stop_sequences"] = list(given.stop)
        self.span = telemetry.tracer().start_span(f"{self.operation} {model_id}", kind=SpanKind.INTERNAL,
                                                  attributes=attributes)

    def admitted(self, model_id: str, engine: str) -> None:
        """The model that answers (the request may have named none) and its engine."""
        self.model = model_id
        self.span.update_name(f"{self.operation} {self.model}")
        self.span.set_attribute("gen_ai.response.model", self.model)
        if engine:
            self.span.set_attribute("parley.engine", engine)

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int,
                 ttft_seconds: float) -> None:
        self.outcome = finish_reason
        self.span.set_attributes({
            "gen_ai.usage.input_tokens": prompt_tokens,
            "gen_ai.usage.output_tokens": completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": cached_prompt_tokens,
            "gen_ai.response.finish_reasons": [finish_reason],
        })
        PROMPT_TOKENS.labels(self.model).inc(prompt_tokens)
        if ttft_seconds > 0:
            self.span.set_attribute("gen_ai.server.time_to_first_token", ttft_seconds)
            TTFT.labels(self.model).observe(ttft_seconds)
            RECENT.add(ttft_seconds, completion_tokens, time.monotonic() - self.started - ttft_seconds)

    def failed(self, exc: BaseException) -> None:
        self.outcome = "error"
        self.span.set_attribute("error.type", type(exc).__name__)
        self.span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))

    def end(self) -> None:
        GENERATIONS.labels(self.model, self.outcome).inc()
        RECENT.ended()
        self.span.end()


class EmbeddingTelemetry:
    """The GenAI span and the metrics of one embedding request; ended once."""

    def __init__(self, model_id: str, inputs: int) -> None:
        self.started = time.monotonic()
        self.model = "unknown"  # the series' label: a catalogue id once resolved, never what a caller typed
        self.outcome = "error"  # until done() says otherwise
        self.span = telemetry.tracer().start_span(
            f"embeddings {model_id}", kind=SpanKind.INTERNAL,
            attributes={"gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "parley",
                        "gen_ai.request.model": model_id, "parley.embedding.inputs": inputs})

    def resolved(self, model_id: str) -> None:
        self.model = model_id
        self.span.update_name(f"embeddings {model_id}")
        self.span.set_attribute("gen_ai.response.model", model_id)

    def done(self, inputs: int, tokens: int, dimensions: int) -> None:
        self.outcome = "ok"
        self.span.set_attributes({"gen_ai.usage.input_tokens": tokens, "gen_ai.embeddings.dimension.count": dimensions})
        EMBEDDING_INPUTS.labels(self.model).inc(inputs)
        EMBEDDING_TOKENS.labels(self.model).inc(tokens)
        EMBEDDING_LATENCY.labels(self.model).observe(time.monotonic() - self.started)

    def failed(self, exc: BaseException) -> None:
        self.span.set_attribute("error.type", type(exc).__name__)
        self.span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))

    def end(self) -> None:
        EMBEDDING_REQUESTS.labels(self.model, self.outcome).inc()
        self.span.end()



def draft_counter(model: str) -> Callable[[int, int], None]:
    """Counts one verified draft of `model`: (accepted, rejected) tokens."""
    accepted, rejected = DRAFT_TOKENS.labels(model, "accepted"), DRAFT_TOKENS.labels(model, "rejected")

    def count(took: int, refused: int) -> None:
        if took:
            accepted.inc(took)
        if refused:
            rejected.inc(refused)
    return count

def token_timer(model_id: str) -> Any:
    """A per-generation callable for the engine's worker thread: call it at each sampled token."""
    inter_token = INTER_TOKEN.labels(model_id)
    generated = GENERATED_TOKENS.labels(model_id)
    last: list[float] = []

    def tick() -> None:
        now = time.perf_counter()
        if last:
            inter_token.observe(now - last[0])
            last[0] = now
        else:
            last.append(now)
        generated.inc()

    return tick
