"""A remote engine: the model runs on OpenAI-compatible servers (vLLM, llama-server, TGI, Ollama) and
Parley stays in front of them — accounts, rate limits, the response cache, conversations, metrics.

Catalogue entry: {"id": "...", "engine": "remote", "source": "http://host:port/v1" (or a list of such
URLs: replicas of one model), "params": {"model": "<upstream model name; default: the id>",
"api_key_env": "<env var holding the upstream's key>", "timeout_seconds": 60,
"health_interval_seconds": 5, "tokenizer": "<GGUF path or package:... whose vocabulary and chat
template count prompts; default: an estimate>"}}.

One pooled HTTP client per model streams `POST /chat/completions` (a raw prompt, the legacy
completions API, `POST /completions`). Errors map to Parley's codes:
upstream 429 is RESOURCE_EXHAUSTED with its Retry-After, 400/422 INVALID_ARGUMENT with its message,
5xx, timeouts and unreachable servers UNAVAILABLE naming the model. A caller that leaves closes the
upstream response (and its connection) at once; the upstream sees the disconnect and stops.

Replicas: each request goes to the healthy upstream with the fewest requests outstanding, except that
a conversation (recognised by its opening messages, which every turn resends) sticks to the upstream
that served it, where its prefix is cached. A periodic `GET /models` marks each upstream healthy or
failed; a failed one is skipped until a check succeeds, and a request that cannot connect tries the
next one. The model reports failed (with the reasons) only when every upstream has failed. All of this
is UpstreamPool's, which a remote embedding model (engines.remote_embedding) shares.

Prompt tokens are counted here only to check the context window, fit long chats and meter requests
whose upstream sends no usage: exactly with `params.tokenizer` (the same GGUF the upstream serves, or
one with the same vocabulary), otherwise estimated at 4 UTF-8 bytes a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.core import telemetry
from services.core.errors import InvalidArgument, ParleyError, ResourceExhausted, Unavailable
from services.core.structured import PLAIN, Structure, ToolCall
from services.inference import metrics, offloop
from services.inference.chat_template import ChatTemplate, TemplateError
from services.inference.engines.base import Chunk, Engine, EngineError, Request, Sampling, Usage
from services.inference.hardware import EngineSettings
from services.inference.grammars import CallDelta, call_json, tools_json

log = logging.getLogger("parley.remote")

AFFINITY_ENTRIES = 65_536  # conversations remembered for session affinity
BYTES_PER_TOKEN = 4  # the estimate without a tokenizer
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
          "content_filter": "stop", "eos": "stop"}


def upstream_urls(source: str) -> list[str]:
    """The base URLs of a remote model's source: one URL or several separated by commas."""
    return [u.strip().rstrip("/") for u in source.split(",") if u.strip()]


@dataclass
class Chat:
    """What a remote engine sends instead of tokens: the (fitted) chat or raw prompt, its structure,
    and the key that keeps a conversation on one upstream."""

    messages: Sequence[dict[str, Any]]
    prompt: str = ""
    structure: Structure = PLAIN


@dataclass
class Upstream:
    url: str
    outstanding: int = 0
    healthy: bool = True
    reason: str = ""
    checked: float = 0.0


@dataclass
class RemoteRequest:
    """One request to an upstream: what to send, then the open response being read."""

    body: dict[str, Any]
    chat: Chat  # counted after the answer when the upstream sends no usage
    affinity: str
    started: float
    deadline: float | None
    upstream: Upstream | None = None
    response: httpx.Response | None = None
    span: Any = None
    usage: Usage = field(default_factory=Usage)
    ended: bool = False  # the upstream call's bookkeeping is done
    release: Any = None  # the engine's clean-up, once the request was admitted
    _cancelled: bool = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        """The caller is done with it: an open response is closed now (the upstream stops)."""
        self._cancelled = value
        if value and not self.ended and self.release is not None:
            asyncio.ensure_future(self.release(self, "cancelled", ""))


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
            self.mark_failed(upstream, _describe(exc))
        upstream.checked = time.monotonic()

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
                self.end(upstream, span, "unreachable", _describe(exc))
                self.mark_failed(upstream, _describe(exc))
                continue
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self.end(upstream, span, "unreachable", _describe(exc))
                self.mark_failed(upstream, _describe(exc))
                continue  # nothing reached the upstream: another may serve it
            except httpx.HTTPError as exc:
                self.end(upstream, span, "error", _describe(exc))
                raise Unavailable(f"model {self.model_id!r}: upstream {upstream.url} failed: {_describe(exc)}") from exc
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
    requests it has in flight; the upstream keeps its own queue."""

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
        return 0  # the upstream queues


class RemoteEngine(PoolBacked, Engine):
    engine_name = "remote"
    sends_chat = True

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        super().__init__(model_id, path, settings, params)
        self.pool = UpstreamPool(model_id, path, params, self._learn_context)
        self._text: Any = None  # a GGUF vocabulary and chat template, when params.tokenizer names one
        self._running = 0

    @property
    def remote_model(self) -> str:
        return self.pool.remote_model

    # --- life cycle ----------------------------------------------------------------------------
    async def load(self) -> None:
        """Reads the tokenizer (if named), opens the pool and checks the upstreams; fails when none answers."""
        if self.params.get("tokenizer"):
            self._text = await asyncio.to_thread(GgufText, self.params["tokenizer"])
            self.vocab_size = self._text.vocab_size
        try:
            await self.pool.open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.pool.close()
        if self._text is not None:
            await asyncio.to_thread(self._text.close)
            self._text = None

    def _load(self) -> None:  # pragma: no cover - load() is overridden: nothing to load in a thread
        raise NotImplementedError

    def _close(self) -> None:  # pragma: no cover - close() is overridden
        raise NotImplementedError

    def _learn_context(self, model: dict[str, Any]) -> None:
        """The context window: the configured one (the catalogue's context_length, else
        PARLEY_CONTEXT_LENGTH), at most what the upstream's model list says (vLLM: max_model_len;
        llama-server: meta.n_ctx_train), as the llama.cpp engine caps it at the model's own."""
        size = model.get("max_model_len") or (model.get("meta") or {}).get("n_ctx_train")
        if isinstance(size, int) and size > 0:
            self.context_length = min(self.settings.context_length, size)

    def output_parser(self, structure: Structure) -> None:
        """None: the upstream parses its own output (content, reasoning and calls arrive apart)."""
        return None

    # --- counting ------------------------------------------------------------------------------
    @property
    def native_tools(self) -> bool:
        return True  # tools travel to the upstream as they are

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, structure: Structure = PLAIN) -> str:
        if self._text is not None:
            return self._text.template.render(messages, add_generation_prompt, tools, structure.template)
        text = "".join(f"{m['role']}\n{m.get('content') or ''}\n" for m in messages)
        return text + (json.dumps(tools) if tools else "")

    def _tokenize(self, text: str) -> list[int]:
        if self._text is not None:
            return self._text.tokenize(text)
        return [0] * -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)  # an estimate: only its length is used

    def _detokenize(self, token: int) -> bytes:  # pragma: no cover - the upstream sends text
        raise NotImplementedError

    def _is_end(self, token: int) -> bool:  # pragma: no cover
        raise NotImplementedError

    def check_sampling(self, sampling: Sampling) -> None:
        """The upstream validates what it accepts (logit_bias ids are its vocabulary's)."""

    # --- generation ------------------------------------------------------------------------------
    def submit(self, prompt: list[int], sampling: Sampling, started: float, deadline: float | None = None,
               *, n: int = 1, top_logprobs: int | None = None, chat: Chat | None = None) -> Request:
        if n > 1:
            raise InvalidArgument("n > 1 is not supported by the remote engine")
        if top_logprobs is not None:
            raise InvalidArgument("logprobs are not supported by the remote engine")
        if chat is None:
            raise InvalidArgument("the remote engine needs the chat, not tokens")
        body = self._body(chat, sampling)
        request = RemoteRequest(body, chat, _affinity(chat), started, deadline)
        request.usage.prompt_tokens = len(prompt)  # 0 unless the chat was fitted (counted) before
        return request  # type: ignore[return-value]

    def _submit(self, request: Request) -> None:  # pragma: no cover - submit is overridden
        raise NotImplementedError

    def _body(self, chat: Chat, sampling: Sampling) -> dict[str, Any]:
        s = sampling
        body: dict[str, Any] = {
            "model": self.remote_model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
        }
        if chat.messages:
            body["messages"] = [_message_json(m) for m in chat.messages]
        else:
            body["prompt"] = chat.prompt  # the legacy completions API: no chat template
        # Beyond OpenAI's parameters only what departs from the neutral value: vLLM and llama-server
        # both accept top_k, min_p and repetition_penalty; others ignore or refuse what they lack.
        for name, value, neutral in (("top_k", s.top_k, 0), ("min_p", s.min_p, 0.0),
                                     ("repetition_penalty", s.repetition_penalty, 1.0),
                                     ("presence_penalty", s.presence_penalty, 0.0),
                                     ("frequency_penalty", s.frequency_penalty, 0.0)):
            if value != neutral:
                body[name] = value
        if s.repetition_penalty != 1.0:
            body["repeat_penalty"] = s.repetition_penalty  # llama-server's name
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in s.logit_bias}
        st = chat.structure
        if st.calls_tools:
            body["tools"] = tools_json(st.tools)
            body["tool_choice"] = ({"type": "function", "function": {"name": st.function}}
                                   if st.tool_choice == "function" else st.tool_choice)
            body["parallel_tool_calls"] = st.parallel
        if st.format == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif st.format == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": json.loads(st.schema)}}
        # The template options, as vLLM and llama-server take them (others ignore what they lack).
        if st.template.kwargs:
            body["chat_template_kwargs"] = json.loads(st.template.kwargs)
        if st.template.reasoning_effort:
            body["reasoning_effort"] = st.template.reasoning_effort
        return body

    def _pick(self, affinity: str, tried: set[int]) -> Upstream | None:
        return self.pool.pick(affinity, tried)

    async def admit(self, request: RemoteRequest) -> None:  # type: ignore[override]
        """Sends the request and waits for the upstream's answer to begin (its status); raises the
        mapped error when no upstream takes it."""
        path = "chat/completions" if "messages" in request.body else "completions"
        call = await self.pool.send(path, request.body, request.affinity)
        request.upstream, request.response, request.span = call.upstream, call.response, call.span
        request.release = self._release
        self._running += 1

    async def _release(self, request: RemoteRequest, outcome: str, error: str) -> None:
        """Closes the upstream response (the upstream sees the disconnect and stops) and ends the
        call's span and metrics; once per request."""
        if request.ended or request.upstream is None or request.response is None:
            return
        request.ended = True
        self._running -= 1
        self.pool.end(request.upstream, request.span, outcome, error)
        await request.response.aclose()

    async def stream(self, request: RemoteRequest) -> AsyncIterator[Chunk]:  # type: ignore[override]
        """The upstream's SSE stream as chunks. A stream cut before its end raises UNAVAILABLE (what
        came before it was already yielded); the deadline ends it with "cancelled"."""
        response, upstream = request.response, request.upstream
        assert response is not None and upstream is not None
        usage = request.usage
        tick = metrics.token_timer(self.model_id)
        calls = StreamedCalls()
        reason: str | None = None
        text: list[str] = []
        thoughts: list[str] = []
        upstream_usage: dict[str, Any] | None = None
        outcome, error = "ok", ""
        try:
            # Silence longer than timeout_seconds is httpx's ReadTimeout; the deadline is checked per line.
            async for line in response.aiter_lines():
                if request.deadline is not None and time.monotonic() > request.deadline:
                    reason, outcome = "cancelled", "deadline"
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    raise Unavailable(f"model {self.model_id!r}: upstream error: {_error_text(event['error'])}")
                if event.get("usage"):
                    upstream_usage = event["usage"]
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or choice.get("text") or ""  # chat, or legacy completions
                    # llama-server, vLLM and DeepSeek name it reasoning_content; vLLM's newer, OpenRouter
                    # and Ollama's OpenAI API `reasoning`.
                    thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if not isinstance(thought, str):
                        thought = ""
                    deltas = [d for call in delta.get("tool_calls") or () if (d := calls.feed(call)) is not None]
                    if piece or thought or deltas:
                        if not usage.time_to_first_token_ms:
                            usage.time_to_first_token_ms = (time.monotonic() - request.started) * 1000
                        tick()
                        text.append(piece)
                        thoughts.append(thought)
                        yield Chunk(text=piece, reasoning=thought, call_deltas=deltas)
                    if choice.get("finish_reason"):
                        reason = FINISH.get(choice["finish_reason"], "stop")
            if reason is None:
                raise Unavailable(f"model {self.model_id!r}: upstream {upstream.url} ended the answer early")
            finished = calls.finished()
            if finished and reason == "stop":
                reason = "tool_calls"
            if not _has_usage(upstream_usage) and not usage.prompt_tokens:
                # Only now, and only for an upstream that sends no usage: counting before the call
                # delayed its start (rendering and tokenizing compete with every request on the loop).
                chat = request.chat
                usage.prompt_tokens = len(await offloop.run(self.prompt_tokens, chat.messages, chat.prompt,
                                                            chat.structure))
            self._usage(usage, upstream_usage, "".join(text), "".join(thoughts), finished)
            yield Chunk(finish_reason=reason, usage=usage, tool_calls=finished)
        except (httpx.HTTPError, ValueError) as exc:
            outcome, error = "cut", _describe(exc)
            raise Unavailable(f"model {self.model_id!r}: upstream {upstream.url} failed mid-answer: {error}") from exc
        except ParleyError as exc:
            outcome, error = "cut", exc.message
            raise
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            if outcome == "ok" and reason is None:
                outcome = "cancelled"  # the consumer left
            await self._release(request, outcome, error)

    def _usage(self, usage: Usage, given: dict[str, Any] | None, text: str, reasoning: str,
               calls: list[ToolCall]) -> None:
        """The upstream's usage when it sent one, else counted here."""
        if _has_usage(given):
            assert given is not None
            usage.prompt_tokens = int(given.get("prompt_tokens") or usage.prompt_tokens)
            usage.completion_tokens = int(given["completion_tokens"])
            details = given.get("prompt_tokens_details") or {}
            usage.cached_prompt_tokens = int(details.get("cached_tokens") or 0)
            completion = given.get("completion_tokens_details") or {}
            usage.reasoning_tokens = int(completion.get("reasoning_tokens") or 0)
            if reasoning and not usage.reasoning_tokens:  # llama-server sends no such detail
                usage.reasoning_tokens = min(self._text_tokens(reasoning), usage.completion_tokens)
            return
        written = text + reasoning + "".join(json.dumps(call_json(c)) for c in calls)
        usage.completion_tokens = len(self._tokenize(written)) - len(self._tokenize(""))
        if reasoning:
            usage.reasoning_tokens = self._text_tokens(reasoning)


class StreamedCalls:
    """The upstream's tool calls as they stream (OpenAI's `delta.tool_calls`: the first piece of a call
    carries its index, id and name, the next ones pieces of its arguments), passed on as CallDelta
    pieces numbered in order of appearance, and the finished calls with the same ids (so that they
    are not sent twice)."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}  # upstream index -> [id, name, arguments]
        self._order: dict[int, int] = {}  # upstream index -> the call's place here

    def feed(self, call: dict[str, Any]) -> CallDelta | None:
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        name, arguments = function.get("name") or "", function.get("arguments") or ""
        slot = self._calls.get(index)
        if slot is None:
            # A call's first piece; an upstream that sends no id gets one here.
            slot = self._calls[index] = [call.get("id") or ToolCall.new_id(), name, arguments]
            self._order[index] = len(self._order)
            return CallDelta(self._order[index], slot[0], name, arguments)
        slot[1] += name  # (a name sent in pieces: the finished call has all of it)
        slot[2] += arguments
        return CallDelta(self._order[index], arguments=arguments) if arguments else None

    def finished(self) -> list[ToolCall]:
        return [ToolCall(c[0], c[1], c[2] or "{}") for _, c in sorted(self._calls.items())]


class GgufText:
    """A GGUF's vocabulary and chat template, without its weights: exact prompt counts for a remote
    model served from the same file (llama.cpp loads only the vocabulary)."""

    def __init__(self, source: str) -> None:
        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose
        from services.inference.registry import resolve_source

        path = resolve_source(source)
        set_verbose(False)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"params.tokenizer: llama.cpp could not read {path}: {exc}") from exc
        self.vocab_size = self._model.n_vocab()
        metadata = self._model.metadata()
        self._add_bos = str(metadata.get("tokenizer.ggml.add_bos_token")).lower() == "true"
        try:
            self.template = ChatTemplate(metadata.get("tokenizer.chat_template"))
        except TemplateError as exc:
            self._model.close()
            raise EngineError(f"params.tokenizer: {exc}") from exc

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)

    def close(self) -> None:
        self._model.close()


def _message_json(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m["tool_calls"]]
        if not out["content"]:
            out["content"] = None
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _has_usage(given: dict[str, Any] | None) -> bool:
    return bool(given) and given.get("completion_tokens") is not None  # type: ignore[union-attr]


def _affinity(chat: Chat) -> str:
    """A conversation's key: its opening (the system prompt and first question), which each of its
    turns resends; the upstream that served it holds that prefix in its cache."""
    opening = []
    for m in chat.messages:
        opening.append(f"{m['role']}\x00{m.get('content') or ''}")
        if m["role"] == "user":
            break
    return hashlib.blake2b("\x01".join(opening or [chat.prompt]).encode(), digest_size=12).hexdigest()


def _describe(exc: BaseException) -> str:
    kind = type(exc).__name__
    text = str(exc)
    return f"{kind}: {text}" if text else kind


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return _error_text(body["error"])[:300]
    return str(body)[:300]
