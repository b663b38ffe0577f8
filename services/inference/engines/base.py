"""The engine interface and what every engine shares.

An engine owns a model in memory and decides what runs when: it takes requests, admits them as
room allows (a full queue is RESOURCE_EXHAUSTED, HTTP 429), evaluates prompts, samples tokens and
streams chunks back. The service above sees only `generate(prompt, sampling) -> async stream of
chunks`; sequences, contexts and threads stay inside the engine. The per-token logic (stop strings,
usage, finish reasons, logprobs) lives in services.inference.engines.sequence.Request.

Engines implement a few blocking hooks (`_load`, `_tokenize`, `_detokenize`, `_is_end`) and
`_submit`, which hands a Request to their scheduler; their `_load` sets `chat_template`
(services.inference.chat_template), which renders chats and knows the model family's chat format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import PLAIN, Structure
from services.inference import fitting
from services.inference.chat_formats import OutputParser
from services.inference.chat_template import ChatTemplate
from services.inference.offloop import checkpoint
from services.inference.engines.sequence import (
    Chunk, Request, Sampling, StopMatcher, TokenLogprob, Usage, common_prefix,
)
from services.inference.hardware import EngineSettings
from services.inference.grammars import call_json, template_input

__all__ = ["Chunk", "Engine", "EngineError", "LoadedModel", "Request", "Sampling", "StopMatcher", "TokenLogprob", "Usage",
           "common_prefix"]


EXACT_COUNT_MESSAGES = 64  # count_tokens renders every prefix up to this many messages…
EXACT_COUNT_CHARACTERS = 65_536  # …while those prefixes hold at most this many characters in all
COUNTED_TEXTS = 16_384  # message contents whose token counts are remembered (a conversation resends its history)


class EngineError(Exception):
    """The engine failed (load or generation)."""


class LoadedModel(ABC):
    """What every engine shares, generation or embedding: its model and settings, loading and
    closing in a thread, and one memory estimate known before the model loads."""

    engine_name = "base"

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        self.model_id = model_id
        self.path = path
        self.settings = settings
        self.params = params
        self.vocab_size = 0  # set by _load
        self._memory_mib = 0

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

    @classmethod
    @abstractmethod
    def estimate_mib(cls, path: str, settings: EngineSettings) -> int:
        """The memory a model holds once loaded, known before it loads (from its files and the
        settings): the registry makes room for this much, and a loaded engine reports it."""

    def memory_mib(self) -> int:
        """Memory held while loaded (estimate_mib, measured at load); 0 when not loaded."""
        return self._memory_mib

    def failure(self) -> str:
        """Why the loaded engine cannot serve now (a remote engine whose upstreams all failed their
        health check); empty when it can."""
        return ""


class Engine(LoadedModel):
    """One loaded generation model. Subclasses fill in the blocking hooks and the scheduler; their
    `_load` starts the scheduler and `_close` stops it (running requests end with an error)."""

    # What the engine's scheduler can do beyond one plain choice per request.
    supports_choices = False  # n > 1
    supports_logprobs = False
    sends_chat = False  # takes the chat itself (a remote engine), not its tokens: grammars and the context limit are its own
    drops_oldest_turns = False  # a chat longer than the prompt's window loses its oldest turns rather than being refused

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        super().__init__(model_id, path, settings, params)
        self.context_length = settings.context_length
        # Texts' token counts by the texts' hashes: each turn of a conversation resends its history.
        self._counted: dict[int, int] = {}

    @property
    @abstractmethod
    def running(self) -> int:
        """Requests generating now."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Requests waiting for room in the engine."""

    def info(self) -> dict[str, Any]:
        info = {"engine": self.engine_name, "device": self.settings.device, "context_length": self.context_length}
        if self.chat_template is not None:
            info["chat_format"] = self.chat_template.format.name
        return info

    # --- text <-> tokens -------------------------------------------------------------------
    chat_template: ChatTemplate | None = None  # set by _load; None: the model takes raw prompts only

    def _template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise InvalidArgument(f"model {self.model_id!r} has no chat template; send a raw prompt instead")
        return self.chat_template

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, structure: Structure = PLAIN) -> str:
        """The chat rendered with the model's chat template (`tools` only when it handles them:
        `native_tools`)."""
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
    def _tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def _detokenize(self, token: int) -> bytes: ...

    @abstractmethod
    def _is_end(self, token: int) -> bool: ...

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
        (services.inference.fitting)."""
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

    def count_tokens(self, messages: Sequence[dict[str, Any]], structure: Structure = PLAIN) -> tuple[int, list[int]]:
        """Total tokens of the prompt (with the tools offered, if any) and how many each message adds.

        For a short chat (up to EXACT_COUNT_MESSAGES messages whose prefixes hold at most
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
        (services.inference.fitting.budget)."""
        return fitting.budget(self.context_length, max_tokens, reserve_tokens)

    # --- generation ------------------------------------------------------------------------
    def check_sampling(self, sampling: Sampling) -> None:
        """Rejects what this engine cannot honour with INVALID_ARGUMENT rather than ignoring it."""
        for token, _ in sampling.logit_bias:
            if token >= self.vocab_size:
                raise InvalidArgument(f"logit_bias: token {token} is not in the model's vocabulary "
                                      f"({self.vocab_size} tokens)")

    def submit(self, prompt: list[int], sampling: Sampling, started: float, deadline: float | None = None,
               *, n: int = 1, top_logprobs: int | None = None, chat: Any = None) -> Request:
        """Admits a request: it is queued or running when this returns. Raises ResourceExhausted
        when the engine's queue is full. The caller awaits `admit`, then streams it with `stream`.
        `chat` (engines.remote.Chat) is for engines that send the chat rather than its tokens."""
        if n > 1 and not self.supports_choices:
            raise InvalidArgument(f"n > 1 is not supported by the {self.engine_name} engine")
        if top_logprobs is not None and not self.supports_logprobs:
            raise InvalidArgument(f"logprobs are not supported by the {self.engine_name} engine")
        request = Request(self.model_id, prompt, sampling, started=started, deadline=deadline,
                          budget=min(sampling.max_tokens, self.answer_room(len(prompt))),
                          detokenize=self._detokenize, is_end=self._is_end, n=n, top_logprobs=top_logprobs)
        self._submit(request)
        return request

    async def admit(self, request: Request) -> None:
        """Waits until the engine has taken the request: local engines have when `submit` returns; a
        remote one once its upstream has answered (its errors are raised here, before any chunk)."""

    @staticmethod
    async def stream(request: Request) -> AsyncIterator[Chunk]:
        """Streams an admitted request's chunks until every choice has ended, the deadline passed
        (finish reason "cancelled") or the consumer went away; either way the engine drops the
        request at its next step."""
        try:
            async for chunk in request.chunks():
                yield chunk
        finally:
            request.cancelled = True

    async def generate(self, prompt: list[int], sampling: Sampling, started: float, deadline: float | None = None,
                       *, n: int = 1, top_logprobs: int | None = None) -> AsyncIterator[Chunk]:
        """`submit` and `stream` in one."""
        request = self.submit(prompt, sampling, started, deadline, n=n, top_logprobs=top_logprobs)
        await self.admit(request)
        async with contextlib.aclosing(self.stream(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    def queue_place(self, request: Request) -> tuple[int, float] | None:
        """Where a submitted request waits for room: (place in line, 1 first; estimated seconds until
        it starts), or None when it runs or is about to. Schedulers that cannot tell say None."""
        return None

    @abstractmethod
    def _submit(self, request: Request) -> None:
        """Queues the request for the scheduler, or raises ResourceExhausted when the queue is full."""
