"""One generation from request to last chunk — shared by the Generate RPC and the OpenAI endpoint.

It validates the request, resolves the model (loading it on first use), renders and counts the
prompt, checks it against the context window and streams the engine's chunks until the end, the
deadline or the caller's cancellation. Admission and scheduling are the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from services.core.errors import InvalidArgument
from services.core import structured
from services.core.sampling import SamplingInput, validate as validate_sampling
from services.core.structured import PLAIN, Structure
from services.inference.engines.base import Chunk, Sampling
from services.inference.metrics import GenerationTelemetry
from services.inference.registry import ModelRecord, ModelRegistry
from services.inference.settings import InferenceSettings
from services.inference.structured import ToolCallParser, grammar_for

def resolve_sampling(given: SamplingInput, settings: InferenceSettings) -> Sampling:
    """Applies defaults; out-of-range values are rejected with INVALID_ARGUMENT."""
    validate_sampling(given)
    return Sampling(
        temperature=0.7 if given.temperature is None else given.temperature,
        top_p=1.0 if given.top_p is None else given.top_p,
        top_k=40 if given.top_k is None else given.top_k,
        repetition_penalty=1.0 if given.repetition_penalty is None else given.repetition_penalty,
        min_p=given.min_p or 0.0,
        presence_penalty=given.presence_penalty or 0.0,
        frequency_penalty=given.frequency_penalty or 0.0,
        logit_bias=tuple(given.logit_bias),
        seed=given.seed,
        max_tokens=given.max_tokens or settings.max_tokens,
        stop=tuple(given.stop),
    )


def validate_messages(messages: Sequence[dict[str, Any]], prompt: str, structure: Structure = PLAIN) -> None:
    if messages and prompt:
        raise InvalidArgument("give either messages or prompt, not both")
    if not messages and not prompt:
        raise InvalidArgument("messages must not be empty")
    if prompt and not structure.plain:
        raise InvalidArgument("tools and response_format need messages, not a raw prompt")
    structured.validate_messages(messages)


async def with_tool_calls(chunks: AsyncIterator[Chunk], structure: Structure) -> AsyncIterator[Chunk]:
    """Each choice's text split into content, tool calls and the pieces of calls being written; a
    choice that made calls finishes with "tool_calls"."""
    parsers: dict[int, ToolCallParser] = {}
    async for chunk in chunks:
        parser = parsers.setdefault(chunk.index, ToolCallParser(structure))
        chunk.text, chunk.tool_calls, chunk.call_deltas = parser.feed(chunk.text)
        if chunk.finish_reason is not None:
            chunk.text += parser.flush()
            if parser.calls and chunk.finish_reason == "stop":
                chunk.finish_reason = "tool_calls"
        yield chunk


class GenerationService:
    def __init__(self, registry: ModelRegistry, settings: InferenceSettings) -> None:
        self.registry = registry
        self.settings = settings

    async def count_tokens(self, model_id: str, messages: Sequence[dict[str, Any]],
                           structure: Structure = PLAIN) -> tuple[int, list[int], int]:
        validate_messages(messages, "")
        record = await self.registry.acquire(model_id)
        try:
            assert record.engine is not None
            total, per_message = await asyncio.to_thread(record.engine.count_tokens, messages, structure)
            return total, per_message, record.engine.context_length
        finally:
            self.registry.done(record)

    async def generate(
        self,
        model_id: str,
        messages: Sequence[dict[str, Any]],
        prompt: str,
        given: SamplingInput,
        timeout: float | None = None,
        *,
        n: int = 1,
        top_logprobs: int | None = None,
        structure: Structure = PLAIN,
    ) -> AsyncIterator[tuple[ModelRecord, Chunk]]:
        """Yields (model, chunk) pairs; each of the n choices ends with a chunk that has its
        finish_reason, and the last chunk carries the usage. Each generation gets a GenAI span and its
        metrics (services.inference.metrics)."""
        observed = GenerationTelemetry(model_id or self.settings.default_model, bool(messages), given)
        try:
            async with contextlib.aclosing(
                    self._generate(model_id, messages, prompt, given, timeout, n, top_logprobs, structure)) as stream:
                async for record, chunk in stream:
                    observed.chunk(record, chunk)
                    yield record, chunk
        except Exception as exc:
            observed.failed(exc)
            raise
        finally:
            observed.end()

    async def _generate(
        self,
        model_id: str,
        messages: Sequence[dict[str, Any]],
        prompt: str,
        given: SamplingInput,
        timeout: float | None,
        n: int,
        top_logprobs: int | None,
        structure: Structure,
    ) -> AsyncIterator[tuple[ModelRecord, Chunk]]:
        started = time.monotonic()
        sampling = resolve_sampling(given, self.settings)
        validate_messages(messages, prompt, structure)
        sampling = replace(sampling, grammar=grammar_for(structure))
        record = await self.registry.acquire(model_id)
        try:
            engine = record.engine
            assert engine is not None
            # Template rendering and tokenizing block; keep them off the loop that streams other requests.
            tokens = await asyncio.to_thread(engine.prompt_tokens, messages, prompt, structure)
            if len(tokens) >= engine.context_length:
                raise InvalidArgument(
                    f"the prompt is {len(tokens)} tokens but model {record.entry.id!r} has a context window "
                    f"of {engine.context_length} tokens; shorten it"
                )
            engine.check_sampling(sampling)
            deadline = started + (timeout if timeout is not None else self.settings.request_timeout_seconds)
            chunks = engine.generate(tokens, sampling, started, deadline, n=n, top_logprobs=top_logprobs)
            if structure.calls_tools:
                chunks = with_tool_calls(chunks, structure)
            async for chunk in chunks:
                yield record, chunk
        finally:
            self.registry.done(record)

