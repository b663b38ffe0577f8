"""One generation from request to last chunk, below the metered flow (services.inference.metered).

It validates the request, resolves the model (loading it on first use), renders and counts the
prompt (fitting a long chat to the context window when asked), has the engine admit it and streams
its chunks until the end, the deadline or the caller's cancellation. Scheduling is the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.core.errors import InvalidArgument
from services.core import structured
from services.core.sampling import SamplingInput, validate as validate_sampling
from services.core.structured import PLAIN, Structure
from services.inference.engines.base import Chunk, Sampling
from services.inference.engines.remote import Chat
from services.inference import fitting, offloop
from services.inference.fitting import Fit
from services.inference.metrics import GenerationTelemetry
from services.inference.registry import ModelRecord, ModelRegistry
from services.inference.settings import InferenceSettings
from services.inference.chat_formats import OutputParser
from services.inference.grammars import after_reasoning, grammar_for

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


async def parsed(chunks: AsyncIterator[Chunk], new_parser: Callable[[], OutputParser]) -> AsyncIterator[Chunk]:
    """Each choice's text split, in the model family's format, into content, reasoning, tool calls and
    the pieces of calls being written; a choice that made calls finishes with "tool_calls" (one cut
    short by max_tokens keeps "length", as OpenAI reports it). The usage counts the reasoning's
    tokens: a piece of reasoning is a token's worth."""
    parsers: dict[int, OutputParser] = {}
    reasoning_tokens = 0
    async for chunk in chunks:
        parser = parsers.get(chunk.index)
        if parser is None:
            parser = parsers[chunk.index] = new_parser()
        out = parser.feed(chunk.text)
        if out.reasoning:
            reasoning_tokens += 1
        if chunk.finish_reason is not None:
            out += parser.finish(truncated=chunk.finish_reason == "length")
            if parser.calls and chunk.finish_reason == "stop":
                chunk.finish_reason = "tool_calls"
        chunk.text, chunk.reasoning, chunk.tool_calls, chunk.call_deltas = out.content, out.reasoning, out.calls, out.deltas
        if chunk.usage is not None:
            chunk.usage.reasoning_tokens = min(reasoning_tokens, chunk.usage.completion_tokens)
        yield chunk


@dataclass(frozen=True)
class Admitted:
    """A generation's first item: the prompt fits and the engine has taken the request."""

    record: ModelRecord
    prompt_tokens: int
    dropped: int  # history messages left out to fit the context window (fitting.Fit)


@dataclass(frozen=True)
class Queued:
    """Before Admitted, when the caller asked for it: the request waits for room in the engine."""

    position: int  # 1: it starts when one running answer ends
    wait_seconds: float  # the engine's estimate


# How often a waiting request's place is looked at (only while it waits, and only when reported).
QUEUE_POLL_SECONDS = 0.05


async def queue_places(engine: Any, request: Any) -> AsyncIterator[Queued]:
    """The request's place in line each time it changes, until the engine runs it."""
    last = None
    while (place := engine.queue_place(request)) is not None:
        if place[0] != last:
            last = place[0]
            yield Queued(place[0], place[1])
        await asyncio.sleep(QUEUE_POLL_SECONDS)


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
        limit, what = self._character_limit(record)
        held = len(prompt) + sum(structured.characters(m) for m in messages)
        if held > limit:
            raise InvalidArgument(f"the request holds {held} characters; at most {limit} are accepted ({what})")

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
            total, per_message = await offloop.run(record.engine.count_tokens, messages, structure)
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
    ) -> AsyncIterator[Queued | Admitted | Chunk]:
        """Yields Queued while the request waits for room (only with `report_queue`), Admitted once the engine has taken the request, then its chunks: each of the n
        choices ends with a chunk that has its finish_reason, and the last chunk carries the usage.
        An error before Admitted means nothing ran. Each generation gets a GenAI span and its
        metrics (services.inference.metrics)."""
        observed = GenerationTelemetry(model_id or self.settings.default_model, bool(messages), given)
        try:
            async with contextlib.aclosing(
                    self._generate(model_id, messages, prompt, given, timeout, n, top_logprobs, structure,
                                   fit, report_queue)) as stream:
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
        report_queue: bool = False,
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
            if not engine.sends_chat:  # a remote upstream has its own grammars
                grammar = grammar_for(structure)
                template = engine.chat_template
                if grammar is not None and template is not None and template.thinking_open(structure.template):
                    # The prompt opened the reasoning block: the grammar starts where it ends.
                    assert template.format.thinking is not None
                    grammar = after_reasoning(grammar, template.format.thinking[1])
                sampling = replace(sampling, grammar=grammar)
                if messages and template is not None:
                    template.format.check(structure, record.entry.id)  # what its format cannot write: a 400
                    sampling = replace(sampling, stop=(*sampling.stop, *template.format.stop))
            if fit is None and messages and engine.drops_oldest_turns:
                fit = Fit()  # BlenderBot's way: the newest turns its encoder takes, not a refusal
            dropped = 0
            sent = messages  # the chat a remote engine sends: fitted, when asked
            # Template rendering and tokenizing block; keep them off the loop that streams other requests,
            # bounded before they start and stopped when the caller leaves (offloop).
            if fit is None and engine.sends_chat:
                # Nothing is counted before the upstream starts: it checks its own context limit (its 400
                # is a 400) and reports the prompt's tokens in its usage; the engine counts them after
                # the answer only when it sends none. The start reports 0 prompt tokens.
                self._check_characters(record, messages, prompt)
                tokens: list[int] = []
            elif fit is None:
                self._check_characters(record, messages, prompt)
                tokens = await offloop.run(engine.prompt_tokens, messages, prompt, structure)
                if engine.answer_room(len(tokens)) <= 0:
                    raise InvalidArgument(
                        f"the prompt is {len(tokens)} tokens but model {record.entry.id!r} has a context window "
                        f"of {engine.context_length} tokens; shorten it"
                    )
            else:
                allowed = engine.prompt_room(given.max_tokens, fit.reserve_tokens or self.settings.max_tokens)
                limit, what = self._character_limit(record)
                kept, dropped = fitting.within_characters(messages, fit.keep_last, limit, what)
                fitted = await offloop.run(engine.fitted_prompt, kept, structure, allowed, fit.keep_last)
                tokens, dropped = fitted.tokens, dropped + fitted.dropped
                sent = fitting.kept(kept, fitted.dropped)
            engine.check_sampling(sampling)
            deadline = started + (timeout if timeout is not None else self.settings.request_timeout_seconds)
            chat = Chat(sent, prompt, structure)
            request = engine.submit(tokens, sampling, started, deadline, n=n, top_logprobs=top_logprobs, chat=chat)
            try:
                if report_queue:
                    async with contextlib.aclosing(queue_places(engine, request)) as places:
                        async for place in places:
                            yield place
                await engine.admit(request)
                yield Admitted(record, len(tokens), dropped)
                chunks = engine.stream(request)
                # A chat's answer is read in the model family's format; a raw prompt's text is as written.
                if messages and engine.output_parser(structure) is not None:
                    chunks = parsed(chunks, lambda: engine.output_parser(structure))
                async with contextlib.aclosing(chunks) as stream:
                    async for chunk in stream:
                        yield chunk
            finally:
                request.cancelled = True  # the engine drops it at its next step, however this ended
        finally:
            self.registry.done(record)
