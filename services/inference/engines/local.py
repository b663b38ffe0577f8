"""Engines that run the model in this process (llama.cpp: engines.llama, transformers:
engines.torch_engine) share one way to answer a request: render the chat with the model's chat
template (services.inference.models.chat_template), tokenize it (fitting a long chat to the context window
when asked), constrain sampling with the grammar of the tools and response format
(services.inference.models.grammars), hand the tokens to the engine's scheduler, report the request's place
while it waits, and read the family's output format (content, reasoning, tool calls) as it streams.

Each engine fills in its blocking hooks (`_load`, `_close`, `_tokenize`, `_detokenize`, `_is_end`)
and `_submit`, which hands a Request (engines.sequence) to its scheduler; `_load` sets
`chat_template` and starts the scheduler, `_close` stops it (running requests end with an error).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import PLAIN, Structure
from services.inference.chat_formats import OutputParser
from services.inference.engines.base import Engine, LocalModel
from services.inference.engines.fair import ANONYMOUS, Owner
from services.inference.engines.request import Admitted, GenerationRequest, Queued, queue_places
from services.inference.engines.sequence import Chunk, Request, Sampling
from services.inference.flow import fitting, offloop
from services.inference.models.chat_template import ChatTemplate
from services.inference.models.grammars import after_reasoning, grammar_for

class TokenEngine(LocalModel, Engine):
    """A generation engine that renders, tokenizes and schedules here. Subclasses implement the
    blocking hooks and `_submit`."""

    # What the engine's scheduler can do beyond one plain choice per request.
    supports_choices = False  # n > 1
    supports_logprobs = False
    drops_oldest_turns = False  # a chat longer than the prompt's window loses its oldest turns rather than being refused
    chat_template: ChatTemplate | None = None  # set by _load; None: the model takes raw prompts only

    def info(self) -> dict[str, Any]:
        info = super().info()
        if self.chat_template is not None:
            info["chat_format"] = self.chat_template.format.name
        return info

    # --- the interface ---------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Queued | Admitted | Chunk]:
        sampling = self._constrained(request)
        fit = request.fit
        if fit is None and request.messages and self.drops_oldest_turns:
            fit = fitting.Fit()  # BlenderBot's way: the newest turns its encoder takes, not a refusal
        dropped = 0
        # Template rendering and tokenizing block; keep them off the loop that streams other requests,
        # bounded before they start and stopped when the caller leaves (offloop).
        if fit is None:
            fitting.check_characters(request.messages, request.prompt, *request.characters)
            tokens = await offloop.run(self.prompt_tokens, request.messages, request.prompt, request.structure)
            if self.answer_room(len(tokens)) <= 0:
                raise InvalidArgument(
                    f"the prompt is {len(tokens)} tokens but model {self.model_id!r} has a context window "
                    f"of {self.context_length} tokens; shorten it"
                )
        else:
            tokens, dropped, _ = await self._fitted(request, fit)
        self.check_sampling(sampling)
        submitted = self.submit(tokens, sampling, request.started, request.deadline, n=request.n,
                                top_logprobs=request.top_logprobs, owner=request.owner)
        try:
            if request.report_queue:
                async with contextlib.aclosing(queue_places(lambda: self.queue_place(submitted), self.line_moved)) as places:
                    async for place in places:
                        yield place
            yield Admitted(len(tokens), dropped)
            chunks = self.stream(submitted)
            # A chat's answer is read in the model family's format; a raw prompt's text is as written.
            structure = request.structure
            if request.messages and self.output_parser(structure) is not None:
                chunks = parsed(chunks, lambda: self.output_parser(structure))
            async with contextlib.aclosing(chunks) as stream:
                async for chunk in stream:
                    yield chunk
        finally:
            submitted.cancelled = True  # the engine drops it at its next step, however this ended

    def _constrained(self, request: GenerationRequest) -> Sampling:
        """The request's sampling with the grammar of its tools and response format, and the stop
        strings of the model's chat format; what that format cannot write is a 400."""
        structure, template = request.structure, self.chat_template
        grammar = grammar_for(structure)
        if grammar is not None and template is not None and template.thinking_open(structure.template):
            # The prompt opened the reasoning block: the grammar starts where it ends.
            assert template.format.thinking is not None
            grammar = after_reasoning(grammar, template.format.thinking[1])
        sampling = replace(request.sampling, grammar=grammar)
        if request.messages and template is not None:
            template.format.check(structure, self.model_id)
            sampling = replace(sampling, stop=(*sampling.stop, *template.format.stop))
        return sampling

    # --- text <-> tokens -------------------------------------------------------------------
    def _template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise InvalidArgument(f"model {self.model_id!r} has no chat template; send a raw prompt instead")
        return self.chat_template

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, structure: Structure = PLAIN) -> str:
        """The chat rendered with the model's chat template."""
        return self._template().render(messages, add_generation_prompt, tools, structure.template)

    @property
    def native_tools(self) -> bool:
        """Whether the model's chat template renders tools, past calls and results itself."""
        return self.chat_template is not None and self.chat_template.native_tools

    def output_parser(self, structure: Structure) -> OutputParser | None:
        """A parser of one choice's text into content, reasoning and calls, in the model family's
        format; None when there is nothing to parse (no reasoning block, no tools offered)."""
        template = self.chat_template
        if template is None or (template.format.thinking is None and not structure.calls_tools
                                and not template.format.own_parser):
            return None
        return template.format.parser(structure, template.thinking_open(structure.template))

    @abstractmethod
    def _detokenize(self, token: int) -> bytes: ...

    @abstractmethod
    def _is_end(self, token: int) -> bool: ...

    # --- scheduling ------------------------------------------------------------------------
    def check_sampling(self, sampling: Sampling) -> None:
        """Rejects what this engine cannot honour with INVALID_ARGUMENT rather than ignoring it."""
        for token, _ in sampling.logit_bias:
            if token >= self.vocab_size:
                raise InvalidArgument(f"logit_bias: token {token} is not in the model's vocabulary "
                                      f"({self.vocab_size} tokens)")

    def submit(self, prompt: list[int], sampling: Sampling, started: float, deadline: float | None = None,
               *, n: int = 1, top_logprobs: int | None = None, owner: Owner = ANONYMOUS) -> Request:
        """Admits a request: it is queued or running when this returns. Raises ResourceExhausted
        when the engine's queue is full."""
        if n > 1 and not self.supports_choices:
            raise InvalidArgument(f"n > 1 is not supported by the {self.engine_name} engine")
        if top_logprobs is not None and not self.supports_logprobs:
            raise InvalidArgument(f"logprobs are not supported by the {self.engine_name} engine")
        request = Request(self.model_id, prompt, sampling, started=started, deadline=deadline,
                          budget=min(sampling.max_tokens, self.answer_room(len(prompt))),
                          detokenize=self._detokenize, is_end=self._is_end, n=n, top_logprobs=top_logprobs,
                          owner=owner)
        self._submit(request)
        return request

    @staticmethod
    async def stream(request: Request) -> AsyncIterator[Chunk]:
        """Streams a submitted request's chunks until every choice has ended, the deadline passed
        (finish reason "cancelled") or the consumer went away; either way the engine drops the
        request at its next step."""
        try:
            async for chunk in request.chunks():
                yield chunk
        finally:
            request.cancelled = True

    def queue_place(self, request: Request) -> tuple[int, float] | None:
        """Where a submitted request waits for room: (place in line, 1 first; estimated seconds until
        it starts), or None when it runs or is about to. Schedulers that cannot tell say None."""
        return None

    def line_moved(self) -> asyncio.Event | None:
        """An event the scheduler sets once its line of waiting requests next moves; None from a
        scheduler that reports no places."""
        return None

    @abstractmethod
    def _submit(self, request: Request) -> None:
        """Queues the request for the scheduler, or raises ResourceExhausted when the queue is full."""


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
