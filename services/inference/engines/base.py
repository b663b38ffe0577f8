"""The engine interface and what every engine shares.

An engine owns a model in memory and decides what runs when: it takes requests, admits them as
room allows (a full queue is RESOURCE_EXHAUSTED, HTTP 429), evaluates prompts, samples tokens and
streams chunks back. The service above sees only `generate(prompt, sampling) -> async stream of
chunks`; sequences, contexts and threads stay inside the engine. The per-token logic (stop strings,
usage, finish reasons, logprobs) lives in services.inference.engines.sequence.Request.

Engines implement a few blocking hooks (`_load`, `_render`, `_tokenize`, `_detokenize`, `_is_end`)
and `_submit`, which hands a Request to their scheduler.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import PLAIN, Structure
from services.inference.engines.sequence import (
    Chunk, Request, Sampling, StopMatcher, TokenLogprob, Usage, common_prefix,
)
from services.inference.hardware import EngineSettings
from services.inference.structured import template_input

__all__ = ["Chunk", "Engine", "EngineError", "Request", "Sampling", "StopMatcher", "TokenLogprob", "Usage",
           "common_prefix"]


EXACT_COUNT_MESSAGES = 64  # count_tokens renders every prefix up to this many messages


class EngineError(Exception):
    """The engine failed (load or generation)."""


class Engine(ABC):
    """One loaded model. Subclasses fill in the blocking hooks and the scheduler."""

    engine_name = "base"
    # What the engine's scheduler can do beyond one plain choice per request.
    supports_choices = False  # n > 1
    supports_logprobs = False

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        self.model_id = model_id
        self.path = path
        self.settings = settings
        self.params = params
        self.context_length = settings.context_length
        self.vocab_size = 0  # set by _load

    # --- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        """Loads weights and starts the scheduler (in a thread: loading blocks)."""
        await asyncio.to_thread(self._load)

    async def close(self) -> None:
        """Stops the scheduler (running requests end with an error) and frees the model."""
        await asyncio.to_thread(self._close)

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def memory_mib(self) -> int:
        """Resident memory estimate while loaded."""

    @property
    @abstractmethod
    def running(self) -> int:
        """Requests generating now."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Requests waiting for room in the engine."""

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine_name, "device": self.settings.device, "context_length": self.context_length}

    # --- text <-> tokens -------------------------------------------------------------------
    @abstractmethod
    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> str:
        """The chat rendered with the model's own chat template (`tools` only when it handles them:
        `native_tools`)."""

    @property
    def native_tools(self) -> bool:
        """Whether the model's chat template renders tools and calls in the format that
        services.inference.structured parses."""
        return False

    @abstractmethod
    def _tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def _detokenize(self, token: int) -> bytes: ...

    @abstractmethod
    def _is_end(self, token: int) -> bool: ...

    def prompt_tokens(self, messages: Sequence[dict[str, Any]] | None, prompt: str | None,
                      structure: Structure = PLAIN) -> list[int]:
        if not messages:
            return self._tokenize(prompt or "")
        chat, tools = template_input(messages, structure, self.native_tools)
        return self._tokenize(self._render(chat, tools=tools))

    def count_tokens(self, messages: Sequence[dict[str, Any]], structure: Structure = PLAIN) -> tuple[int, list[int]]:
        """Total tokens of the prompt (with the tools offered, if any) and how many each message adds.

        Up to EXACT_COUNT_MESSAGES messages, a message's share is exactly what it adds to the rendered
        chat (every prefix is rendered: quadratic). Beyond, the work stays linear: each message's
        content is tokenized once and the template's own tokens are shared out evenly (1,024
        messages took 44 s the exact way)."""
        chat, _ = template_input(messages, PLAIN, self.native_tools)
        total = len(self.prompt_tokens(messages, None, structure))
        if len(chat) <= EXACT_COUNT_MESSAGES:
            per_message, previous = [], 0
            for i in range(1, len(chat) + 1):
                n = len(self._tokenize(self._render(chat[:i], add_generation_prompt=False)))
                per_message.append(n - previous)
                previous = n
            return total, per_message
        bos = len(self._tokenize(""))
        contents = [len(self._tokenize(m.get("content") or "")) - bos for m in chat]
        rendered = len(self._tokenize(self._render(chat, add_generation_prompt=False)))
        overhead = max(0, rendered - sum(contents))
        share, extra = divmod(overhead, len(chat))
        return total, [n + share + (i < extra) for i, n in enumerate(contents)]

    # --- generation ------------------------------------------------------------------------
    def check_sampling(self, sampling: Sampling) -> None:
        """Rejects what this engine cannot honour with INVALID_ARGUMENT rather than ignoring it."""
        for token, _ in sampling.logit_bias:
            if token >= self.vocab_size:
                raise InvalidArgument(f"logit_bias: token {token} is not in the model's vocabulary "
                                      f"({self.vocab_size} tokens)")

    async def generate(self, prompt: list[int], sampling: Sampling, started: float, deadline: float | None = None,
                       *, n: int = 1, top_logprobs: int | None = None) -> AsyncIterator[Chunk]:
        """Streams chunks until every choice has ended, the deadline passed (finish reason
        "cancelled") or the consumer went away; either way the engine drops the request at its
        next step. Raises ResourceExhausted when the engine's queue is full."""
        if n > 1 and not self.supports_choices:
            raise InvalidArgument(f"n > 1 is not supported by the {self.engine_name} engine")
        if top_logprobs is not None and not self.supports_logprobs:
            raise InvalidArgument(f"logprobs are not supported by the {self.engine_name} engine")
        request = Request(self.model_id, prompt, sampling, started=started, deadline=deadline,
                          budget=min(sampling.max_tokens, self.context_length - len(prompt)),
                          detokenize=self._detokenize, is_end=self._is_end, n=n, top_logprobs=top_logprobs)
        self._submit(request)
        try:
            async for chunk in request.chunks():
                yield chunk
        finally:
            request.cancelled = True

    @abstractmethod
    def _submit(self, request: Request) -> None:
        """Queues the request for the scheduler, or raises ResourceExhausted when the queue is full."""
