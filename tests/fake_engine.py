"""A scripted engine for fast tests of everything above the engine: the generation service, the
metered flow, the Generate RPC, the OpenAI path and the session turn. Never an integration default:
the integration tests run the real bundled model.

Words are tokens: the tokenizer gives a word its own id, the chat renders as `<role> content` lines,
and an answer is the script's words, one per step, each after `delay` seconds; the script may fail
after some words. The engine honours the engine contract: admission (a full queue is
ResourceExhausted), cancellation at the next step, the request's deadline and usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.errors import ResourceExhausted
from services.inference.engines.base import Engine, EngineError, Request
from services.inference.engines.local import TokenEngine
from services.inference.models.chat_template import ChatTemplate

END = 0
BOS = 1


@dataclass
class Script:
    words: Sequence[str] = ("Hello", "there.")
    delay: float = 0.0  # seconds before each word
    fail_after: int | None = None  # raise EngineError after this many words
    end: bool = True  # the end-of-turn token after the words (else the answer runs to max_tokens)


class ScriptedEngine(TokenEngine):
    engine_name = "scripted"

    def __init__(self, model_id: str, path: str, settings: Any, params: dict) -> None:
        super().__init__(model_id, path, settings, params)
        self.script = Script()
        self.capacity = 4  # requests admitted at once; more are ResourceExhausted
        self.requests: list[Request] = []  # every request submitted, in order
        self._words: dict[str, int] = {}
        self._ids: dict[int, str] = {}
        self._active: set[asyncio.Task[None]] = set()

    # The blocking hooks
    def _load(self) -> None:
        self.vocab_size = 1000
        # Prompts render with _render below; the template gives the output format (Hermes, the fallback).
        self.chat_template = ChatTemplate(params.get("chat_template") if (params := self.params) else None)

    def _close(self) -> None:
        for task in self._active:
            task.cancel()

    @classmethod
    def estimate_mib(cls, path: str, settings: Any) -> int:
        return 1

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return 0

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, structure: Any = None) -> str:
        lines = [f"<{m['role']}> {m.get('content') or ''}" for m in messages]
        return "\n".join(lines + (["<assistant>"] if add_generation_prompt else []))

    def _tokenize(self, text: str) -> list[int]:
        return [BOS, *(self._id(word) for word in text.split())]

    def _id(self, word: str) -> int:
        if word not in self._words:
            self._words[word] = len(self._words) + 2
            self._ids[self._words[word]] = word
        return self._words[word]

    def _detokenize(self, token: int) -> bytes:
        return f" {self._ids[token]}".encode()

    def _is_end(self, token: int) -> bool:
        return token == END

    # The scheduler
    def _submit(self, request: Request) -> None:
        if len(self._active) >= self.capacity:
            raise ResourceExhausted("the engine is full; retry shortly", retry_after=1)
        self.requests.append(request)
        task = asyncio.get_running_loop().create_task(self._play(request, self.script))
        self._active.add(task)
        task.add_done_callback(self._active.discard)

    async def _play(self, request: Request, script: Script) -> None:
        request.admitted = True
        words = list(script.words)
        step = 0
        while not request.done:
            await asyncio.sleep(script.delay)
            if request.cancelled:
                return
            if script.fail_after is not None and step >= script.fail_after:
                request.fail(EngineError("generation failed: the scripted engine broke"))
                return
            if step < len(words):
                request.token(0, self._id(words[step]))
            elif script.end:
                request.token(0, END)
            else:
                request.token(0, self._id("more"))
            step += 1


def scripted_engines(monkeypatch: Any) -> list[ScriptedEngine]:
    """Makes the model registry load ScriptedEngines; returns the list of those it creates."""
    made: list[ScriptedEngine] = []

    def create(model_id: str, path: str, settings: Any, params: dict, task: str = "chat") -> Engine:
        made.append(ScriptedEngine(model_id, path, settings, params))
        return made[-1]

    monkeypatch.setattr("services.inference.models.registry.create_engine", create)
    return made
