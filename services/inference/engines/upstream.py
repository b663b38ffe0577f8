"""The upstreams of a remote model (engines.remote for chat, engines.remote_embedding for
embeddings): one pooled HTTP client per model, periodic health checks of `GET /models`,
least-outstanding balancing with conversation affinity, failover to the next upstream when one cannot
be reached, and upstream errors mapped to Parley's (429 RESOURCE_EXHAUSTED with its Retry-After,
400/413/422 INVALID_ARGUMENT with its message, 5xx, timeouts and unreachable servers UNAVAILABLE
naming the model).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.core import telemetry
from services.core.errors import InvalidArgument, ParleyError, ResourceExhausted, Unavailable
from services.inference import metrics
from services.inference.engines.base import EngineError
from services.inference.models.hardware import EngineSettings

log = logging.getLogger("parley.remote")

AFFINITY_ENTRIES = 65_536  # conversations remembered for session affinity


def upstream_urls(source: str) -> list[str]:
    """The base URLs of a remote model's source: one URL or several separated by commas."""
    return [u.strip().rstrip("/") for u in source.split(",") if u.strip()]


@dataclass
class Upstream:
    url: str
    outstanding: int = 0
    healthy: bool = True
    reason: str = ""
    checked: float = 0.0


@dataclass
class Call:
    """One upstream call whose answer has begun (status 200): where it went, its open response, its span."""

    upstream: Upstream
    response: httpx.Response
    span: Any


class UpstreamPool:
    """A remote model's upstreams, shared by its chat and embedding engines: one pooled HTTP client,
    periodic health checks of `GET /models`, least-outstanding balancing with affinity, failover to the
    next upstream when one cannot be reached, and upstream errors mapped to Parley's."""

    transport: httpx.AsyncBaseTransport | None = None  # unit tests hand in httpx.MockTransport

    def __init__(self, model_id: str, source: str, params: dict[str, Any],
                 on_model: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.model_id = model_id
        self.upstreams = [Upstream(u) for u in upstream_urls(source)]
        self.remote_model = str(params.get("model") or model_id)
        self.timeout = float(params.get("timeout_seconds", 60))
        self.health_interval = float(params.get("health_interval_seconds", 5))
        self._key_env = params.get("api_key_env") or ""
        self._on_model = on_model  # told the upstream's entry for the model (its context window)
        self._client: httpx.AsyncClient | None = None
        self._checker: asyncio.Task[None] | None = None
        self._affinity: OrderedDict[str, Upstream] = OrderedDict()

    async def open(self) -> None:
        """Opens the connection pool and checks the upstreams; fails when none answers."""
        if not self.upstreams:
            raise EngineError(f"model {self.model_id}: no upstream URL in its source")
        headers = {}
        if self._key_env:
            key = os.environ.get(self._key_env)
            if not key:
                raise EngineError(f"model {self.model_id}: the environment variable {self._key_env} "
                                  "(params.api_key_env) holding the upstream's key is not set")
            headers["authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            transport=self.transport, headers=headers, timeout=httpx.Timeout(self.timeout, connect=min(5.0, self.timeout)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        await self.check()
        if not any(u.healthy for u in self.upstreams):
            reasons = self.failure()
            await self.close()
            raise EngineError(reasons)
        self._checker = asyncio.create_task(self._check_periodically())

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def check(self) -> None:
        """One round of health checks: GET /models on every upstream, concurrently."""
        await asyncio.gather(*(self._check(u) for u in self.upstreams))

    async def _check(self, upstream: Upstream) -> None:
        assert self._client is not None
        try:
            answer = await self._client.get(f"{upstream.url}/models", timeout=min(5.0, self.timeout))
            if answer.status_code != 200:
                raise EngineError(f"GET /models answered {answer.status_code}")
            served = [m.get("id") for m in answer.json().get("data", [])]
            if served and self.remote_model not in served:
                raise EngineError(f"it serves {', '.join(map(str, served))}, not {self.remote_model}")
            for m in answer.json().get("data", []):
                if m.get("id") == self.remote_model and self._on_model is not None:
                    self._on_model(m)
            if not upstream.healthy:
                log.info("upstream recovered", extra={"fields": {"model": self.model_id, "upstream": upstream.url}})
            upstream.healthy, upstream.reason = True, ""
        except (httpx.HTTPError, EngineError, ValueError, AttributeError) as exc:
            self.mark_failed(upstream, describe(exc))
        upstream.checked = time.monotonic()

    async def parallel(self, upstream: Upstream) -> int | None:
        """How many requests the upstream runs at once, when it says: llama-server's `GET /props` (at
        the server's root, not under /v1) answers `total_slots`. None from any other answer or failure."""
        assert self._client is not None
        try:
            answer = await self._client.get(f"{upstream.url.removesuffix('/v1')}/props", timeout=min(5.0, self.timeout))
            slots = answer.json().get("total_slots") if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else None

    def mark_failed(self, upstream: Upstream, reason: str) -> None:
        if upstream.healthy:
            log.warning("upstream failed", extra={"fields": {"model": self.model_id, "upstream": upstream.url,
                                                             "reason": reason}})
        upstream.healthy, upstream.reason = False, reason
        metrics.UPSTREAM_FAILURES.labels(self.model_id, upstream.url).inc()

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.check()

    def failure(self) -> str:
        if any(u.healthy for u in self.upstreams):
            return ""
        return "; ".join(f"upstream {u.url}: {u.reason}" for u in self.upstreams)

    def info(self) -> dict[str, Any]:
        return {"upstreams": [{"url": u.url, "healthy": u.healthy, "reason": u.reason, "outstanding": u.outstanding}
                              for u in self.upstreams],
                "remote_model": self.remote_model}

    def pick(self, affinity: str, tried: set[int]) -> Upstream | None:
        """The conversation's upstream while it is healthy, else the healthy one with the fewest
        requests outstanding. An empty affinity (embeddings) only balances."""
        known = self._affinity.get(affinity) if affinity else None
        if known is not None and known.healthy and id(known) not in tried:
            self._affinity.move_to_end(affinity)
            return known
        candidates = [u for u in self.upstreams if u.healthy and id(u) not in tried]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda u: u.outstanding)
        if affinity:
            self._affinity[affinity] = chosen
            self._affinity.move_to_end(affinity)
            if len(self._affinity) > AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return chosen

    async def send(self, path: str, body: dict[str, Any], affinity: str = "") -> Call:
        """POSTs the body and waits for the answer to begin (its status), trying the next upstream
        when one cannot be reached or answers 5xx. Raises the mapped error otherwise. The caller
        reads the response and hands the call back to `end` once."""
        if self._client is None:
            raise Unavailable(f"model {self.model_id!r} is not loaded")
        tried: set[int] = set()
        stale = False  # a pooled connection was found closed once already
        while True:
            upstream = self.pick(affinity, tried)
            if upstream is None:
                raise Unavailable(f"model {self.model_id!r}: no upstream is reachable ("
                                  f"{self.failure() or 'every upstream failed this request'})")
            tried.add(id(upstream))
            url = f"{upstream.url}/{path}"
            span = telemetry.tracer().start_span(
                f"POST {url}", kind=SpanKind.CLIENT,
                attributes={"http.request.method": "POST", "url.full": url,
                            "server.address": upstream.url, "gen_ai.request.model": self.remote_model,
                            "parley.model": self.model_id})
            headers: dict[str, str] = {}
            propagate.inject(headers, context=trace.set_span_in_context(span))
            upstream.outstanding += 1
            try:
                req = self._client.build_request("POST", url, json=body, headers=headers)
                response = await self._client.send(req, stream=True)
            except httpx.RemoteProtocolError as exc:
                if not stale:
                    # A kept-alive connection the upstream closed as it was reused (llama-server's HTTP
                    # library closes idle ones after 5 s): nothing was served; once, try again on a new one
                    # rather than fail the request and mark a healthy upstream failed.
                    stale = True
                    self.end(upstream, span, "stale", "")
                    tried.discard(id(upstream))
                    continue
                self.end(upstream, span, "unreachable", describe(exc))
                self.mark_failed(upstream, describe(exc))
                continue
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self.end(upstream, span, "unreachable", describe(exc))
                self.mark_failed(upstream, describe(exc))
                continue  # nothing reached the upstream: another may serve it
            except httpx.HTTPError as exc:
                self.end(upstream, span, "error", describe(exc))
                raise Unavailable(f"model {self.model_id!r}: upstream {upstream.url} failed: {describe(exc)}") from exc
            except BaseException:
                self.end(upstream, span, "cancelled", "")
                raise
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code != 200:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                error = self.status_error(response)
                self.end(upstream, span, str(response.status_code), error.message)
                if response.status_code >= 500 and len(tried) < len(self.upstreams):
                    continue  # an upstream in trouble: another may serve it
                raise error
            return Call(upstream, response, span)

    def end(self, upstream: Upstream, span: Any, outcome: str, error: str) -> None:
        """A call's bookkeeping, once: its upstream's count, its metric and span (closing the
        response is the caller's: it is async)."""
        upstream.outstanding -= 1
        metrics.UPSTREAM_REQUESTS.labels(self.model_id, upstream.url, outcome).inc()
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def status_error(self, response: httpx.Response) -> ParleyError:
        message = _error_message(response)
        code = response.status_code
        if code == 429:
            retry = response.headers.get("retry-after")
            try:
                after = float(retry) if retry is not None else None
            except ValueError:
                after = None
            return ResourceExhausted(f"model {self.model_id!r} is busy upstream: {message}", retry_after=after)
        if code in (400, 413, 422):
            return InvalidArgument(f"model {self.model_id!r} refused the request: {message}")
        return Unavailable(f"model {self.model_id!r}: upstream answered {code}: {message}")


class PoolBacked:
    """What an engine whose work runs on an UpstreamPool says about itself (chat: RemoteEngine,
    embeddings: remote_embedding.RemoteEmbeddingEngine): the pool's health and upstreams, and the
    requests it has in flight. Embeddings keep no queue here (the upstream queues them); RemoteEngine
    bounds its chat requests in flight and says what runs and waits itself."""

    pool: UpstreamPool
    _running: int

    @property
    def upstreams(self) -> list[Upstream]:
        return self.pool.upstreams

    @classmethod
    def estimate_mib(cls, path: str, settings: EngineSettings) -> int:
        return 0  # the weights live on the upstream

    async def check(self) -> None:
        """One round of the pool's health checks, now."""
        await self.pool.check()

    def failure(self) -> str:
        return self.pool.failure()

    def info(self) -> dict[str, Any]:
        return {**super().info(), **self.pool.info()}  # type: ignore[misc]

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return 0  # the upstream queues (embeddings)


def describe(exc: BaseException) -> str:
    kind = type(exc).__name__
    text = str(exc)
    return f"{kind}: {text}" if text else kind


def error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return error_text(body["error"])[:300]
    return str(body)[:300]
