"""POST /v1/chat/completions from request bytes to response bytes: rate limit, response cache,
generation and OpenAI's JSON or SSE rendering.

Order of a request: parse (400 on a bad body) → rate-limit check (429 with Retry-After) and, at the
same time, a cache lookup when deterministic → either the cached answer, rendered exactly like a
generated one, or a generation. A complete deterministic answer (finish reason stop or length) is stored afterwards, and
the tokens are recorded, in background tasks so that neither delays the end of the response.
The cache service being down changes nothing but speed: see services.cache.client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from parley.cache.v1 import cache_pb2
from parley.inference.v1 import inference_pb2 as pb

from services.cache import keys
from services.cache.client import CacheClient
from services.core import structured
from services.core.errors import ParleyError
from services.core.sampling import to_proto as sampling_pb
from services.inference import openai_compat
from services.inference.engines.base import EngineError, Usage
from services.inference.registry import ModelRegistry
from services.inference.service import GenerationService

log = logging.getLogger("parley.inference")

CACHE_HEADER = "x-parley-cache"
SSE = "text/event-stream"
JSON = "application/json"
# The engine's finish reasons as the contract names them (the Generate RPC and cached answers).
REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "cancelled": pb.FINISH_REASON_CANCELLED, "tool_calls": pb.FINISH_REASON_TOOL_CALLS}
REASON_NAMES = {v: k for k, v in REASONS.items()}

Mark = Callable[[str], Awaitable[None]]


class ChatCompletions:
    def __init__(self, generation: GenerationService, registry: ModelRegistry, cache: CacheClient | None) -> None:
        self.generation = generation
        self.registry = registry
        self.cache = cache
        self._background: set[asyncio.Task[Any]] = set()

    def _later(self, work: Coroutine[Any, Any, Any]) -> None:
        # create_task copies the context, so the caller's identity (and credentials) go along.
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=2)

    @staticmethod
    def _failure(exc: Exception) -> str:
        """What a stream cut short by `exc` tells its client; a bug is logged and stays vague."""
        if isinstance(exc, ParleyError):
            return exc.message
        if isinstance(exc, EngineError):
            return str(exc)
        log.error("a chat completion stream failed", exc_info=exc)
        return "internal error"

    def _key(self, req: openai_compat.ChatCompletionRequest) -> cache_pb2.CompletionKey | None:
        if self.cache is None or not req.cacheable:
            return None
        try:
            sampling = sampling_pb(req.sampling)
        except (ValueError, TypeError):
            return None  # out of the proto's range: generation rejects it with a precise message
        if not CacheClient.is_deterministic(sampling):
            return None
        try:
            entry = self.registry.get(req.model).entry
        except ParleyError:
            return None  # generation reports the unknown model with the proper status
        return cache_pb2.CompletionKey(
            model=entry.id, model_fingerprint=entry.fingerprint(), sampling=sampling,
            messages=[structured.message_to_proto(m) for m in req.messages],
            structured=structured.to_proto(req.structure))

    async def create(self, body: bytes, timeout: float | None, mark: Mark) -> AsyncIterator[tuple[str, bytes]]:
        """Yields (content type, bytes). `mark` sends the x-parley-cache value before the first bytes."""
        req = openai_compat.parse_request(body)
        key = self._key(req)
        cached = None
        if self.cache is not None:
            # One round trip's wait instead of two: the lookup does not depend on the limit's answer.
            lookups = [self.cache.lookup(key)] if key is not None else []
            _, *found = await asyncio.gather(self.cache.check_rate_limit(), *lookups)
            cached = found[0] if found else None
        if cached is not None:
            await mark("hit")
            for part in self._replay(req, key, cached):  # type: ignore[arg-type]
                yield part
            return
        async for part in self._generate(req, key, timeout, mark):
            yield part

    def _replay(self, req: openai_compat.ChatCompletionRequest, key: cache_pb2.CompletionKey,
                cached: cache_pb2.CachedCompletion) -> list[tuple[str, bytes]]:
        """The cached answer in the same shape as a generated one. Its prompt counts as cached."""
        u = cached.usage
        usage = Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                      cached_prompt_tokens=u.prompt_tokens)
        reason = REASON_NAMES.get(cached.finish_reason, "stop")
        calls = structured.replayed_calls(cached.tool_calls)
        writer = openai_compat.CompletionWriter(key.model, key.model_fingerprint)
        if not req.stream:
            return [(JSON, writer.complete([openai_compat.ChoiceResult(cached.text, reason, tool_calls=calls)], usage))]
        usage_flag = req.include_usage
        parts = [writer.chunk({"role": "assistant", "content": ""}, include_usage=usage_flag)]
        if cached.text:
            parts.append(writer.chunk({"content": cached.text}, include_usage=usage_flag))
        if calls:
            parts.append(writer.chunk({"tool_calls": openai_compat.tool_calls_json(calls, at=0)},
                                      include_usage=usage_flag))
        parts.append(writer.chunk({}, reason, final=True, include_usage=usage_flag))
        if usage_flag:
            parts.append(writer.usage_chunk(usage))
        parts.append(writer.DONE)
        return [(SSE, p) for p in parts]

    async def _generate(self, req: openai_compat.ChatCompletionRequest, key: cache_pb2.CompletionKey | None,
                        timeout: float | None, mark: Mark) -> AsyncIterator[tuple[str, bytes]]:
        stream = self.generation.generate(req.model, req.messages, "", req.sampling, timeout,
                                          n=req.n, top_logprobs=req.top_logprobs, structure=req.structure)
        writer: openai_compat.CompletionWriter | None = None
        logprobs = req.top_logprobs is not None
        choices = [openai_compat.ChoiceResult("", None, [] if logprobs else None) for _ in range(req.n)]
        parts: list[list[str]] = [[] for _ in range(req.n)]
        streamed: set[str] = set()  # ids of calls sent piece by piece
        pieces = 0
        usage: Usage | None = None
        try:
            async for record, chunk in stream:
                if writer is None:
                    # Only once generation has started: an error before it stays a plain error status.
                    await mark("miss")
                    writer = openai_compat.CompletionWriter(record.entry.id, record.entry.fingerprint())
                    if req.stream:
                        # The first message fixes the HTTP content type of the whole response.
                        for i in range(req.n):
                            yield SSE, writer.chunk({"role": "assistant", "content": ""},
                                                    include_usage=req.include_usage, index=i)
                choice = choices[chunk.index]
                parts[chunk.index].append(chunk.text)
                pieces += bool(chunk.text)
                if choice.logprobs is not None:
                    choice.logprobs.extend(chunk.logprobs)
                if req.stream:
                    if chunk.text or chunk.logprobs:
                        yield SSE, writer.chunk({"content": chunk.text}, include_usage=req.include_usage,
                                                index=chunk.index, logprobs=chunk.logprobs if logprobs else None)
                    # A call's pieces as they are written (its id and name, then its arguments bit by
                    # bit); a call that was not streamed so comes whole once complete. Each carries
                    # its index within the choice, as the SDK assembles them.
                    calls = [openai_compat.call_delta_json(d) for d in chunk.call_deltas]
                    streamed.update(d.id for d in chunk.call_deltas if d.id)
                    calls += [openai_compat.tool_calls_json([c], at=len(choice.tool_calls) + k)[0]
                              for k, c in enumerate(chunk.tool_calls) if c.id not in streamed]
                    if calls:
                        yield SSE, writer.chunk({"tool_calls": calls}, include_usage=req.include_usage,
                                                index=chunk.index)
                    if chunk.finish_reason is not None:
                        yield SSE, writer.chunk({}, chunk.finish_reason, final=True, include_usage=req.include_usage,
                                                index=chunk.index)
                choice.tool_calls += chunk.tool_calls
                if chunk.finish_reason is not None:
                    choice.finish_reason, choice.text = chunk.finish_reason, "".join(parts[chunk.index])
                if chunk.usage is not None:  # the request's last chunk
                    usage = chunk.usage
                    if req.stream:
                        if req.include_usage:
                            yield SSE, writer.usage_chunk(usage)
                        yield SSE, writer.DONE
                    else:
                        yield JSON, writer.complete(choices, usage)
                    reason = choices[0].finish_reason
                    if key is not None and self.cache is not None and REASONS.get(reason) in keys.COMPLETE:
                        self._later(self.cache.store(key, cache_pb2.CachedCompletion(
                            text=choices[0].text, finish_reason=REASONS[reason],
                            tool_calls=structured.calls_to_proto(choices[0].tool_calls),
                            usage=pb.Usage(prompt_tokens=usage.prompt_tokens,
                                           completion_tokens=usage.completion_tokens,
                                           total_tokens=usage.total_tokens))))
        except Exception as exc:
            if writer is None or not req.stream:
                raise  # nothing sent yet, or one JSON answer: the status says it
            # The stream is under way (200 and its first chunks are out): it ends with OpenAI's error
            # event, which the SDK raises as an APIError, instead of stopping without a word.
            yield SSE, writer.error_event(self._failure(exc))
        finally:
            if self.cache is not None and writer is not None:
                # A client that leaves early still pays for what was generated (about a token a piece).
                self._later(self.cache.record_usage(usage.total_tokens if usage is not None else pieces))
