"""The metered completion: one flow for every way in to a generation — the Generate RPC (which
session turns use), POST /v1/chat/completions and the legacy POST /v1/completions.

Order: the rate-limit check and, at the same time, a response-cache lookup when the request is
deterministic → either the cached answer, replayed as the same items a generation yields, or the
generation itself. Afterwards, in background tasks so that neither delays the end of the answer, a
complete deterministic answer (finish reason stop, length or tool_calls) is stored and the tokens
are recorded. A client that leaves early still pays for what was generated. The cache service being
down changes nothing but speed: see services.cache.client.

Callers keep only what is their own: the session service its persistence and events, the OpenAI
path its JSON and SSE shapes. Both see the same items: Started once the request is admitted, then
the engine's chunks (services.inference.engines.base.Chunk).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from parley.cache.v1 import cache_pb2
from parley.inference.v1 import inference_pb2 as pb

from services.cache import keys
from services.cache.client import CacheClient
from services.core import structured
from services.core.background import Background
from services.core.errors import ParleyError
from services.core.sampling import SamplingInput
from services.core.sampling import to_proto as sampling_pb
from services.core.structured import PLAIN, Structure
from services.inference.engines.base import Chunk, Usage
from services.inference.engines.fair import current_owner
from services.inference.flow.fitting import Fit
from services.inference.flow.service import Admitted, GenerationService, Queued
from services.inference.models.registry import ModelRegistry

# The engine's finish reasons as the contract names them (the Generate RPC and cached answers).
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "cancelled": pb.FINISH_REASON_CANCELLED, "tool_calls": pb.FINISH_REASON_TOOL_CALLS}
FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}


@dataclass(frozen=True)
class Completion:
    """What a caller asks for."""

    model: str  # empty: the default model
    messages: Sequence[dict[str, Any]]
    sampling: SamplingInput
    prompt: str = ""  # a raw prompt instead of messages
    structure: Structure = PLAIN
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs
    fit: Fit | None = None  # None: a chat too long for the context window is INVALID_ARGUMENT
    report_queue: bool = False  # Queued items before Started while the engine has no room yet

    @property
    def cacheable(self) -> bool:
        """One plain answer to a chat or a raw prompt: what the response cache stores (no logprobs,
        one choice)."""
        return self.n == 1 and self.top_logprobs is None and bool(self.messages or self.prompt)


@dataclass(frozen=True)
class Started:
    """The first item: the request is admitted; nothing was generated yet."""

    model: str
    fingerprint: str
    cached: bool  # replayed from the response cache
    prompt_tokens: int
    dropped: int  # history messages left out to fit the context window


class MeteredCompletions:
    def __init__(self, generation: GenerationService, registry: ModelRegistry, cache: CacheClient | None) -> None:
        self.generation = generation
        self.registry = registry
        self.cache = cache
        self._background = Background()

    async def close(self) -> None:
        """Lets the bookkeeping of finished answers complete."""
        await self._background.settle()

    def key(self, request: Completion) -> cache_pb2.CompletionKey | None:
        """The response-cache key of a deterministic, cacheable request; None otherwise."""
        if self.cache is None or not request.cacheable:
            return None
        try:
            sampling = sampling_pb(request.sampling)
        except (ValueError, TypeError):
            return None  # out of the proto's range: generation rejects it with a precise message
        if not CacheClient.is_deterministic(sampling):
            return None
        try:
            record = self.registry.get(request.model)
        except ParleyError:
            return None  # generation reports the unknown model with the proper status
        key = cache_pb2.CompletionKey(
            model=record.entry.id, model_fingerprint=record.fingerprint(), sampling=sampling,
            messages=[structured.message_to_proto(m) for m in request.messages],
            structured=structured.to_proto(request.structure), prompt=request.prompt)
        if request.fit is not None:
            key.fit.CopyFrom(pb.HistoryFit(keep_last=request.fit.keep_last, reserve_tokens=request.fit.reserve_tokens))
        return key

    async def count_tokens(self, model: str, messages: Sequence[dict[str, Any]],
                           structure: Structure = PLAIN) -> tuple[int, list[int], int]:
        """GenerationService.count_tokens within the caller's rate limit: counting renders and
        tokenizes a whole chat, work a caller must not get for free (it records no tokens)."""
        if self.cache is not None:
            await self.cache.check_rate_limit()
        return await self.generation.count_tokens(model, messages, structure)

    async def run(self, request: Completion, timeout: float | None) -> AsyncIterator[Queued | Started | Chunk]:
        """Started, then the answer's chunks (with `report_queue`, Queued items may come first). Errors before Started (rate limit, unknown model,
        too long, no room in the engine) mean the request did nothing."""
        key = self.key(request)
        cached = None
        weight = 1.0  # the caller's fair share in the engine, as the rate limits say (engines.fair)
        if self.cache is not None:
            # One round trip's wait instead of two: the lookup does not depend on the limit's answer.
            lookups = [self.cache.lookup(key)] if key is not None else []
            weight, *found = await asyncio.gather(self.cache.check_rate_limit(), *lookups)
            cached = found[0] if found else None
        if cached is not None and key is not None and self.cache is not None:
            u = cached.usage
            self._background.later(self.cache.record_usage(
                key.model, u.prompt_tokens, u.completion_tokens, cached_prompt_tokens=u.prompt_tokens, cached=True))
            yield Started(key.model, key.model_fingerprint, True, u.prompt_tokens, cached.dropped_messages)
            # The prompt counts as cached, as a fully reused KV cache would.
            yield Chunk(text=cached.text, finish_reason=FINISH_NAMES.get(cached.finish_reason, "stop"),
                        usage=Usage(u.prompt_tokens, u.completion_tokens, cached_prompt_tokens=u.prompt_tokens,
                                    reasoning_tokens=u.reasoning_tokens),
                        tool_calls=structured.replayed_calls(cached.tool_calls), reasoning=cached.reasoning)
            return
        answer = structured.Answer()  # the first choice's, the one the cache stores
        reason: str | None = None
        pieces = 0
        started: Started | None = None
        settled = False
        try:
            async for item in self.generation.generate(
                    request.model, request.messages, request.prompt, request.sampling, timeout, n=request.n,
                    top_logprobs=request.top_logprobs, structure=request.structure, fit=request.fit,
                    report_queue=request.report_queue, owner=current_owner(weight)):
                if isinstance(item, Queued):
                    yield item
                    continue
                if isinstance(item, Admitted):
                    record = item.record
                    started = Started(record.entry.id, record.fingerprint(), False, item.prompt_tokens, item.dropped)
                    yield started
                    continue
                pieces += bool(item.text or item.reasoning)
                if item.index == 0:
                    answer.add(item.text, item.reasoning, item.tool_calls)
                    reason = item.finish_reason or reason
                if item.usage is not None and started is not None:
                    # The answer is complete: its bookkeeping starts before the caller sends the last
                    # bytes, so that the same request right after finds it cached.
                    settled = True
                    self._settle(key, started, answer, reason, item.usage)
                yield item
        finally:
            if self.cache is not None and started is not None and not settled:
                # An answer that did not end (its usage never came): about a token a piece.
                self._background.later(self.cache.record_usage(started.model, started.prompt_tokens, pieces))

    def _settle(self, key: cache_pb2.CompletionKey | None, started: Started, answer: structured.Answer,
                reason: str | None, usage: Usage) -> None:
        """Records a finished answer's tokens and stores it when it is complete and deterministic."""
        if self.cache is None:
            return
        self._background.later(self.cache.record_usage(started.model, usage.prompt_tokens, usage.completion_tokens,
                                                       cached_prompt_tokens=usage.cached_prompt_tokens))
        if key is not None and FINISH_REASONS.get(reason or "") in keys.COMPLETE:
            self._background.later(self.cache.store(key, cache_pb2.CachedCompletion(
                text=answer.text, reasoning=answer.reasoning, finish_reason=FINISH_REASONS[reason or ""],
                tool_calls=structured.calls_to_proto(answer.calls), dropped_messages=started.dropped,
                usage=pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                               total_tokens=usage.total_tokens, reasoning_tokens=usage.reasoning_tokens))))
