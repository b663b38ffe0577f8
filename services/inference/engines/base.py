"""The engine interface and what every engine shares.

An engine owns a model in memory and decides what runs when: it takes requests, admits them as
room allows (a full queue is RESOURCE_EXHAUSTED, HTTP 429), evaluates prompts, samples tokens and
streams chunks back. The service above sees only `generate(request) -> async stream` of Queued,
Admitted and chunks (services.inference.engines.request) and `count_tokens`; chat templates,
tokens, grammars, sequences, contexts, threads and upstreams stay inside the engine. The per-token
logic (stop strings, usage, finish reasons, logprobs) lives in
services.inference.engines.sequence.Request.

Engine here holds what every chat engine shares: counting a chat's tokens (`_tokenize` and `_render`
are each engine's) and fitting a long chat to the context window. Engines that run the model here
derive from services.inference.engines.local.TokenEngine; services.inference.engines.remote's
engine sends the chat to an upstream.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.core.errors import ResourceExhausted
from services.core.structured import PLAIN, Structure
from services.inference.engines.request import Admitted, GenerationRequest, Queued
from services.inference.engines.sequence import (
    Chunk, Request, Sampling, StopMatcher, TokenLogprob, Usage, common_prefix,
)
from services.inference.flow import fitting, offloop
from services.inference.flow.offloop import checkpoint
from services.inference.models.grammars import call_json, template_input
from services.inference.models.hardware import EngineSettings

__all__ = ["Admitted", "Chunk", "Engine", "EngineError", "GenerationRequest", "LoadedModel", "LocalModel", "Queued",
           "Request", "Sampling", "StopMatcher", "TokenLogprob", "Usage", "common_prefix", "queue_full"]


EXACT_COUNT_MESSAGES = 64  # count_tokens renders every prefix up to this many messages…
EXACT_COUNT_CHARACTERS = 65_536  # …while those prefixes hold at most this many characters in all
COUNTED_TEXTS = 16_384  # message contents whose token counts are remembered (a conversation resends its history)


class EngineError(Exception):
    """The engine failed (load or generation)."""


def queue_full(what: str, running: int, queued: int, depth: int) -> ResourceExhausted:
    """Every engine's one refusal when its queue is full: RESOURCE_EXHAUSTED (HTTP 429), retry in a
    second, saying what runs and waits."""
    return ResourceExhausted(f"the server is busy: {running} {what} running and {queued} queued "
                             f"(queue depth {depth}); retry shortly", retry_after=1)


class LoadedModel(ABC):
    """What every engine shares, generation or embedding: its model and settings, loading and
    closing, and one memory estimate known before the model loads."""

    engine_name = "base"

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        self.model_id = model_id
        self.path = path
        self.settings = settings
        self.params = params
        self.vocab_size = 0  # set by load
        self._memory_mib = 0

    @abstractmethod
    async def load(self) -> None:
        """Loads the model, or opens the connections to where it runs."""

    @abstractmethod
    async def close(self) -> None:
        """Frees the model."""

    @classmethod
    @abstractmethod
    def estimate_mib(cls, path: str, settings: EngineSettings) -> int:
        """The memory a model holds once loaded, known before it loads (from its files and the
        settings): the registry makes room for this much, and a loaded engine reports it."""

    @property
    @abstractmethod
    def running(self) -> int:
        """Requests running now."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Requests waiting for room in the engine."""

    def memory_mib(self) -> int:
        """Memory held while loaded (estimate_mib, measured at load); 0 when not loaded."""
        return self._memory_mib

    def failure(self) -> str:
        """Why the loaded engine cannot serve now (a remote engine whose upstreams all failed their
        health check); empty when it can."""
        return ""


class LocalModel(LoadedModel):
    """A model whose weights load into this process: `_load` and `_close` block, so they run in a
    thread."""

    async def load(self) -> None:
        """Loads the weights (in a thread: loading blocks)."""
        await asyncio.to_thread(self._load)
        self._memory_mib = await asyncio.to_thread(self.estimate_mib, self.path, self.settings)

    async def close(self) -> None:
        """Frees the model."""
        await asyncio.to_thread(self._close)
        self._memory_mib = 0

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...


class Engine(LoadedModel):
    """One loaded generation model: `generate` answers a request, `count_tokens` counts a chat."""

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        super().__init__(model_id, path, settings, params)
        self.context_length = settings.context_length
        # Texts' token counts by the texts' hashes: each turn of a conversation resends its history.
        self._counted: dict[int, int] = {}

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Queued | Admitted | Chunk]:
        """Yields Queued while the request waits for room (only with `report_queue`), Admitted once
        the engine has taken it, then its chunks: each of the n choices ends with a chunk that has its
        finish_reason, and the last chunk carries the usage. An error before Admitted means nothing
        ran. The request is dropped at the engine's next step however the stream ends (its deadline,
        an error, the consumer leaving)."""

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine_name, "device": self.settings.device, "context_length": self.context_length}

    # --- text <-> tokens -------------------------------------------------------------------
    @abstractmethod
    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, structure: Structure = PLAIN) -> str:
        """The chat as the model reads it (`tools` only when it handles them: `native_tools`)."""

    @abstractmethod
    def _tokenize(self, text: str) -> list[int]: ...

    @property
    @abstractmethod
    def native_tools(self) -> bool:
        """Whether `_render` writes tools, past calls and results itself (else template_input
        describes them in the messages)."""

    def prompt_tokens(self, messages: Sequence[dict[str, Any]] | None, prompt: str | None,
                      structure: Structure = PLAIN) -> list[int]:
        checkpoint()  # each render and tokenization is one piece of a request's work: stop between them
        if not messages:
            return self._tokenize(prompt or "")
        chat, tools = template_input(messages, structure, self.native_tools)
        return self._tokenize(self._render(chat, tools=tools, structure=structure))

    def fitted_prompt(self, messages: Sequence[dict[str, Any]], structure: Structure, allowed: int,
                      keep_last: int) -> fitting.Fitted:
        """The chat's prompt tokens with its oldest turns left out until at most `allowed` remain
        (services.inference.flow.fitting)."""
        return fitting.fit(messages, keep_last, allowed, lambda chat: self.prompt_tokens(chat, None, structure),
                           self._shares)

    def _text_tokens(self, text: str) -> int:
        """The text's tokens without the BOS the tokenizer adds, counted once per distinct text. Keys
        are hashes (only estimates come from these counts); the table starts over when full."""
        key = hash(text)
        count = self._counted.get(key)
        if count is None:
            checkpoint()
            count = len(self._tokenize(text)) - len(self._tokenize(""))
            if len(self._counted) >= COUNTED_TEXTS:
                self._counted.clear()
            self._counted[key] = count
        return count

    def _shares(self, messages: Sequence[dict[str, Any]], total: int) -> list[int]:
        """Each message's estimated part of a prompt of `total` tokens: its text's tokens (counted
        once per distinct text) and an even share of the rest, the template's own tokens."""
        counts = []
        for m in messages:
            text = m.get("content") or ""
            calls = m.get("tool_calls") or ()
            if calls:
                text += "".join(json.dumps(call_json(c), ensure_ascii=False) for c in calls)
            counts.append(self._text_tokens(text))
        share, extra = divmod(max(0, total - sum(counts)), len(counts))
        return [n + share + (i < extra) for i, n in enumerate(counts)]

    async def count_tokens(self, messages: Sequence[dict[str, Any]],
                           structure: Structure = PLAIN) -> tuple[int, list[int]]:
        """Total tokens of the prompt (with the tools offered, if any) and how many each message adds,
        counted off the event loop (offloop: rendering and tokenizing block)."""
        return await offloop.run(self._count_tokens, messages, structure)

    def _count_tokens(self, messages: Sequence[dict[str, Any]], structure: Structure) -> tuple[int, list[int]]:
        """For a short chat (up to EXACT_COUNT_MESSAGES messages whose prefixes hold at most
        EXACT_COUNT_CHARACTERS characters in all), a message's share is exactly what it adds to the
        rendered chat (every prefix is rendered: quadratic, hence the bounds). Beyond, the work stays
        linear: each message's content is tokenized once and the template's own tokens are shared out
        evenly (1,024 messages took 44 s the exact way)."""
        chat, _ = template_input(messages, PLAIN, self.native_tools)
        total = len(self.prompt_tokens(messages, None, structure))
        sizes = [len(m.get("content") or "") for m in chat]
        prefixes = sum(sizes[i] * (len(sizes) - i) for i in range(len(sizes)))  # characters over every prefix
        if len(chat) <= EXACT_COUNT_MESSAGES and prefixes <= EXACT_COUNT_CHARACTERS:
            per_message, previous = [], 0
            for i in range(1, len(chat) + 1):
                checkpoint()
                n = len(self._tokenize(self._render(chat[:i], add_generation_prompt=False, structure=structure)))
                per_message.append(n - previous)
                previous = n
            return total, per_message
        return total, self._shares(chat, len(self._tokenize(self._render(chat, add_generation_prompt=False,
                                                                          structure=structure))))

    # --- windows ---------------------------------------------------------------------------
    def answer_room(self, prompt_tokens: int) -> int:
        """The most tokens an answer to a prompt of `prompt_tokens` may have; 0 or less: the prompt
        does not fit. A causal model's answer shares the context window with its prompt."""
        return self.context_length - prompt_tokens

    def prompt_room(self, max_tokens: int | None, reserve_tokens: int) -> int:
        """The most tokens a fitted chat's prompt may have, room for its answer kept
        (services.inference.flow.fitting.budget)."""
        return fitting.budget(self.context_length, max_tokens, reserve_tokens)

    async def _fitted(self, request: GenerationRequest,
                      fit: fitting.Fit) -> tuple[list[int], int, Sequence[dict[str, Any]]]:
        """A long chat fitted to the context window: its prompt tokens, how many messages were left
        out, and the messages kept. A cut by characters comes first (linear, before anything
        renders), then the token count decides (rendering and tokenizing off the loop: offloop)."""
        allowed = self.prompt_room(request.asked_max_tokens, fit.reserve_tokens or request.reserve_tokens)
        kept, dropped = fitting.within_characters(request.messages, fit.keep_last, *request.characters)
        fitted = await offloop.run(self.fitted_prompt, kept, request.structure, allowed, fit.keep_last)
        return fitted.tokens, dropped + fitted.dropped, fitting.kept(kept, fitted.dropped)
