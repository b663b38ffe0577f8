"""One generation from request to last chunk, below the metered flow (services.inference.flow.metered).

It validates the request, refuses what cannot fit before anything loads for it, resolves the model
(loading it on first use), hands the engine one GenerationRequest (services.inference.engines.request)
and passes on what the engine's `generate` yields, with a GenAI span and metrics. Rendering,
tokenizing, fitting a long chat, grammars, scheduling and the model family's output format are the
engine's (services.inference.engines).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.core import structured
from services.core.errors import InvalidArgument
from services.core.sampling import SamplingInput, validate as validate_sampling
from services.core.structured import PLAIN, Structure
from services.inference.engines import request as engine_request
from services.inference.engines.base import Chunk, Sampling
from services.inference.engines.fair import Owner, current_owner
from services.inference.engines.request import GenerationRequest, Queued
from services.inference.flow import fitting
from services.inference.flow.fitting import Fit
from services.inference.metrics import GenerationTelemetry
from services.inference.models.registry import ModelRecord, ModelRegistry
from services.inference.settings import InferenceSettings

CHARACTERS_PER_TOKEN = 8  # text that fits a context window averages fewer characters a token


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


@dataclass(frozen=True)
class Admitted:
    """A generation's first item (after any Queued): the engine's Admitted
    (services.inference.engines.request) with the model that runs it, whose id and fingerprint key
    the cache."""

    record: ModelRecord
    prompt_tokens: int
    dropped: int  # history messages left out to fit the context window (fitting.Fit)


class GenerationService:
    def __init__(self, registry: ModelRegistry, settings: InferenceSettings) -> None:
        self.registry = registry
        self.settings = settings

    def _character_limit(self, record: ModelRecord) -> tuple[int, str]:
        """The most characters a request's messages may hold for this model, and what sets it. Before
        the model is loaded, the window its load asks for (the catalogue's context_length, else
        PARLEY_CONTEXT_LENGTH): the loaded engine's is never larger, so a request refused now would be
        refused after a load too."""
        if self.settings.max_prompt_characters:
            return self.settings.max_prompt_characters, "PARLEY_MAX_PROMPT_CHARACTERS"
        engine = record.engine
        context = engine.context_length if engine is not None else (
            record.entry.context_length or self.settings.context_length)
        return context * CHARACTERS_PER_TOKEN, (f"{CHARACTERS_PER_TOKEN} per token of model {record.entry.id!r}'s "
                                                f"{context}-token context window")

    def _check_characters(self, record: ModelRecord, messages: Sequence[dict[str, Any]], prompt: str) -> None:
        """Refuses, before anything renders it, a request that cannot fit the model: its tokens would
        take longer to count than any answer is worth."""
        fitting.check_characters(messages, prompt, *self._character_limit(record))

    def _check_before_load(self, model_id: str, messages: Sequence[dict[str, Any]], prompt: str,
                           fit: Fit | None) -> None:
        """What a request can make large is refused before anything is loaded for it (the message
        count: validate_messages); a loaded model's request is checked against its own window once,
        after acquire. A fitted chat drops old turns instead: only its newest must fit."""
        record = self.registry.find(model_id)
        if record.engine is not None:
            return
        if fit is None:
            self._check_characters(record, messages, prompt)
        else:
            fitting.within_characters(messages, fit.keep_last, *self._character_limit(record))

    async def count_tokens(self, model_id: str, messages: Sequence[dict[str, Any]],
                           structure: Structure = PLAIN) -> tuple[int, list[int], int]:
        validate_messages(messages, "")
        self._check_before_load(model_id, messages, "", None)
        record = await self.registry.acquire(model_id)
        try:
            assert record.engine is not None
            self._check_characters(record, messages, "")  # the loaded model's own window
            total, per_message = await record.engine.count_tokens(messages, structure)
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
        fit: Fit | None = None,
        report_queue: bool = False,
        owner: Owner | None = None,
    ) -> AsyncIterator[Queued | Admitted | Chunk]:
        """Yields Queued while the request waits for room (only with `report_queue`), Admitted once the engine has taken the request, then its chunks: each of the n
        choices ends with a chunk that has its finish_reason, and the last chunk carries the usage.
        An error before Admitted means nothing ran. Each generation gets a GenAI span and its
        metrics (services.inference.metrics). The engine shares its room between owners (engines.fair):
        `owner` defaults to the caller of the RPC, with an equal share."""
        observed = GenerationTelemetry(model_id or self.settings.default_model, bool(messages), given)
        try:
            async with contextlib.aclosing(
                    self._generate(model_id, messages, prompt, given, timeout, n, top_logprobs, structure,
                                   fit, report_queue, owner or current_owner())) as stream:
                async for item in stream:
                    if isinstance(item, Queued):
                        pass
                    elif isinstance(item, Admitted):
                        observed.admitted(item.record.entry.id,
                                          item.record.settings.engine if item.record.settings else "")
                    elif item.usage is not None and item.finish_reason is not None:
                        u = item.usage
                        observed.finished(item.finish_reason, u.prompt_tokens, u.completion_tokens,
                                          u.cached_prompt_tokens, u.time_to_first_token_ms / 1000)
                    yield item
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
        fit: Fit | None,
        report_queue: bool,
        owner: Owner,
    ) -> AsyncIterator[Queued | Admitted | Chunk]:
        started = time.monotonic()
        sampling = resolve_sampling(given, self.settings)
        validate_messages(messages, prompt, structure)
        if fit is not None and not messages:
            raise InvalidArgument("fitting a chat to the context window needs messages, not a raw prompt")
        self._check_before_load(model_id, messages, prompt, fit)
        record = await self.registry.acquire(model_id)
        try:
            engine = record.engine
            assert engine is not None
            asked = GenerationRequest(
                messages, prompt, sampling, started,
                deadline=started + (timeout if timeout is not None else self.settings.request_timeout_seconds),
                characters=self._character_limit(record), asked_max_tokens=given.max_tokens,
                reserve_tokens=self.settings.max_tokens, structure=structure, n=n, top_logprobs=top_logprobs,
                fit=fit, report_queue=report_queue, owner=owner)
            async with contextlib.aclosing(engine.generate(asked)) as stream:
                async for item in stream:
                    if isinstance(item, engine_request.Admitted):
                        yield Admitted(record, item.prompt_tokens, item.dropped)
                    else:
                        yield item
        finally:
            self.registry.done(record)
