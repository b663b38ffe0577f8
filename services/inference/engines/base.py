"""The engine interface and what every engine shares.

An engine owns a model in memory and a few *slots*. A slot is one sequence's state (a KV cache)
plus the tokens that state holds. Generation runs in a worker thread per slot; tokens travel to the
event loop through an asyncio queue. The scheduler (services.inference.scheduler) picks the free
slot whose cached tokens share the longest prefix with the new prompt, so a conversation's next
turn only pays for its new tokens.

Engines implement four small blocking hooks (`_tokenize`, `_render`, `_detokenize`, `_decode`);
stop sequences, UTF-8 assembly, max_tokens, usage and cancellation live here, once.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from services.inference.hardware import EngineSettings
from services.inference.metrics import token_timer


class EngineError(Exception):
    """The engine failed (load or generation)."""


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters (defaults applied, validated)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()


@dataclass
class Chunk:
    """A piece of a generation. The last chunk has finish_reason and usage set."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    usage: "Usage | None" = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    time_to_first_token_ms: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Slot:
    index: int
    state: Any = None  # engine-specific: a llama.cpp context, a torch KV cache…
    tokens: list[int] = field(default_factory=list)  # what the state holds
    last_used: float = 0.0
    busy: bool = False
    worker: "asyncio.Future[None] | None" = None  # the running generation's thread
    # Every generation of a slot runs on this one thread. llama.cpp's CPU backend parallelizes with
    # OpenMP, which keeps a team of threads per calling thread: decoding from whichever thread of a
    # shared pool is free builds several teams, whose idle members spin and steal the cores (measured:
    # ~135 tok/s fell to ~90 from the fourth request on, on 2 cores).
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation"))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StopMatcher:
    """Assembles token bytes into text and cuts it at the first stop sequence.

    Text that could be the start of a stop sequence is held back until it is known not to be."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Returns the text that is safe to emit now."""
        self._pending += self._decoder.decode(data)
        found = [at for at in (self._pending.find(stop) for stop in self._stop) if at != -1]
        if found:
            out, self._pending, self.stopped = self._pending[: min(found)], "", True
            return out
        if self._hold == 0:
            out, self._pending = self._pending, ""
            return out
        cut = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out


class Engine(ABC):
    """One loaded model. Subclasses fill in the blocking hooks."""

    engine_name = "base"

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        self.model_id = model_id
        self.path = path
        self.settings = settings
        self.params = params
        self.slots: list[Slot] = []
        self.context_length = settings.context_length
        self._active = 0
        self._active_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        """Loads weights and creates the slots (in a thread: loading blocks)."""
        await asyncio.to_thread(self._load)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    @abstractmethod
    def _load(self) -> None: ...

    def _close(self) -> None:
        self.slots = []

    @abstractmethod
    def memory_mib(self) -> int:
        """Resident memory estimate while loaded."""

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine_name, "device": self.settings.device, "context_length": self.context_length,
                "slots": len(self.slots)}

    # --- text <-> tokens -------------------------------------------------------------------
    @abstractmethod
    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered with the model's own chat template."""

    @abstractmethod
    def _tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def _detokenize(self, token: int) -> bytes: ...

    @abstractmethod
    def _is_end(self, token: int) -> bool: ...

    @abstractmethod
    def _decode(self, slot: Slot, prompt: list[int], sampling: Sampling, threads: int) -> Iterator[int]:
        """Evaluates `prompt` in `slot` and yields sampled tokens. It reuses what the slot holds
        unless slot.tokens is empty, and leaves slot.tokens equal to what its state holds."""

    def prompt_tokens(self, messages: Sequence[dict[str, str]] | None, prompt: str | None) -> list[int]:
        text = self._render(messages) if messages else (prompt or "")
        return self._tokenize(text)

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> tuple[int, list[int]]:
        """Total tokens of the rendered chat and how many each message adds."""
        per_message = []
        previous = 0
        for i in range(1, len(messages) + 1):
            n = len(self._tokenize(self._render(messages[:i], add_generation_prompt=False)))
            per_message.append(n - previous)
            previous = n
        total = len(self._tokenize(self._render(messages)))
        return total, per_message

    # --- generation ------------------------------------------------------------------------
    async def generate(self, slot: Slot, prompt: list[int], sampling: Sampling, started: float,
                       deadline: float | None = None) -> AsyncIterator[Chunk]:
        """Streams chunks from `slot` until the end, the deadline (finish reason "cancelled") or the
        consumer's cancellation; either way the worker stops at its next token. `slot.worker` is the
        worker's future: the slot is not free until it is done (see SlotPool.release)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Chunk | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        slot.worker = loop.run_in_executor(slot.executor, self._run, slot, prompt, sampling, started, cancel, emit)
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=remaining)
                except TimeoutError:
                    yield Chunk(finish_reason="cancelled")
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    # The worker has sent its last chunk and is returning: wait for it, so the slot
                    # is free (and warm) by the time the caller can ask for the next turn.
                    await asyncio.shield(slot.worker)
                    yield item
                    return
                yield item
        finally:
            cancel.set()

    def _run(self, slot: Slot, prompt: list[int], sampling: Sampling, started: float,
             cancel: threading.Event, emit: Any) -> None:
        with self._active_lock:
            self._active += 1
        try:
            if sampling.seed is not None:
                # A seed promises repeatable output, and logits from a cached prefix differ in the
                # last bits from a fresh prefill: seeded requests always evaluate the whole prompt.
                slot.tokens = []
            reused = max(0, min(common_prefix(slot.tokens, prompt), len(prompt) - 1))
            usage = Usage(prompt_tokens=len(prompt), cached_prompt_tokens=reused)
            matcher = StopMatcher(sampling.stop)
            finish = "length"
            budget = min(sampling.max_tokens, self.context_length - len(prompt))
            if budget <= 0:
                emit(Chunk(finish_reason="length", usage=usage))
                return
            tokens = self._decode(slot, prompt, sampling, self._threads())
            tick = token_timer(self.model_id)
            for token in tokens:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if usage.completion_tokens == 0:
                    usage.time_to_first_token_ms = (time.monotonic() - started) * 1000
                if self._is_end(token):
                    finish = "stop"
                    break
                usage.completion_tokens += 1
                tick()
                text = matcher.feed(self._detokenize(token))
                if matcher.stopped:
                    if text:
                        emit(Chunk(text=text))
                    finish = "stop"
                    break
                if text:
                    emit(Chunk(text=text))
                if usage.completion_tokens >= budget:
                    break
            tokens.close()  # lets the engine record what its KV cache now holds
            tail = "" if matcher.stopped else matcher.flush()
            emit(Chunk(text=tail, finish_reason=finish, usage=usage))
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, raised there
            emit(EngineError(f"generation failed: {exc}") if not isinstance(exc, EngineError) else exc)
        finally:
            slot.last_used = time.monotonic()
            with self._active_lock:
                self._active -= 1

    def _threads(self) -> int:
        """Threads for one decode step: the configured cores shared among running slots."""
        return max(1, self.settings.threads // max(1, self._active))
