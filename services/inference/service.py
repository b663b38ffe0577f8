"""One generation from request to last chunk — shared by the Generate RPC and the OpenAI endpoint.

It validates the request, resolves the model (loading it on first use), renders and counts the
prompt, checks it against the context window, waits for a slot and streams chunks until the end,
the deadline or the caller's cancellation.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from services.core.errors import DeadlineExceeded, InvalidArgument
from services.inference.engines.base import Chunk, Sampling
from services.inference.registry import ModelRecord, ModelRegistry
from services.inference.settings import InferenceSettings

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SamplingInput:
    """Sampling parameters as a caller sent them: None means not set."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()


def resolve_sampling(given: SamplingInput, settings: InferenceSettings) -> Sampling:
    """Applies defaults and rejects out-of-range values with INVALID_ARGUMENT."""

    def check(name: str, value: float | None, low: float, high: float) -> None:
        if value is not None and (math.isnan(value) or not low <= value <= high):
            raise InvalidArgument(f"{name} must be between {low} and {high}, got {value}")

    check("temperature", given.temperature, 0.0, 2.0)
    check("top_p", given.top_p, 0.0, 1.0)
    check("top_k", given.top_k, 0, 1000)
    check("repetition_penalty", given.repetition_penalty, 0.5, 2.0)
    check("max_tokens", given.max_tokens, 1, 1_000_000)
    if given.top_p is not None and given.top_p == 0.0:
        raise InvalidArgument("top_p must be greater than 0")
    if len(given.stop) > 8 or any(not s or len(s) > 256 for s in given.stop):
        raise InvalidArgument("stop takes at most 8 non-empty sequences of at most 256 characters")
    return Sampling(
        temperature=0.7 if given.temperature is None else given.temperature,
        top_p=1.0 if given.top_p is None else given.top_p,
        top_k=40 if given.top_k is None else given.top_k,
        repetition_penalty=1.0 if given.repetition_penalty is None else given.repetition_penalty,
        seed=given.seed,
        max_tokens=given.max_tokens or settings.max_tokens,
        stop=tuple(given.stop),
    )


def validate_messages(messages: Sequence[dict[str, str]], prompt: str) -> None:
    if messages and prompt:
        raise InvalidArgument("give either messages or prompt, not both")
    if not messages and not prompt:
        raise InvalidArgument("messages must not be empty")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")


class GenerationService:
    def __init__(self, registry: ModelRegistry, settings: InferenceSettings) -> None:
        self.registry = registry
        self.settings = settings

    async def count_tokens(self, model_id: str, messages: Sequence[dict[str, str]]) -> tuple[int, list[int], int]:
        validate_messages(messages, "")
        record = await self.registry.acquire(model_id)
        try:
            assert record.engine is not None
            total, per_message = await asyncio.to_thread(record.engine.count_tokens, messages)
            return total, per_message, record.engine.context_length
        finally:
            self.registry.done(record)

    async def generate(
        self,
        model_id: str,
        messages: Sequence[dict[str, str]],
        prompt: str,
        given: SamplingInput,
        timeout: float | None = None,
    ) -> AsyncIterator[tuple[ModelRecord, Chunk]]:
        """Yields (model, chunk) pairs; the last chunk carries finish_reason and usage."""
        started = time.monotonic()
        sampling = resolve_sampling(given, self.settings)
        validate_messages(messages, prompt)
        record = await self.registry.acquire(model_id)
        try:
            engine, pool = record.engine, record.pool
            assert engine is not None and pool is not None
            # Template rendering and tokenizing block; keep them off the loop that streams other requests.
            tokens = await asyncio.to_thread(engine.prompt_tokens, messages, prompt)
            if len(tokens) >= engine.context_length:
                raise InvalidArgument(
                    f"the prompt is {len(tokens)} tokens but model {record.entry.id!r} has a context window "
                    f"of {engine.context_length} tokens; shorten it"
                )
            deadline = started + (timeout if timeout is not None else self.settings.request_timeout_seconds)
            try:
                slot = await asyncio.wait_for(pool.acquire(tokens), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise DeadlineExceeded("the deadline passed while waiting for a free generation slot") from None
            try:
                async for chunk in engine.generate(slot, tokens, sampling, started, deadline):
                    yield record, chunk
            finally:
                pool.release(slot)
        finally:
            self.registry.done(record)

