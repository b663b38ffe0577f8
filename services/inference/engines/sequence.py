"""One generation request inside an engine, and the per-token logic every engine shares.

A `Request` is created on the event loop by `TokenEngine.generate` (engines.local) and handed to
the engine's scheduler, which runs on the engine's own thread. The scheduler calls `Request.token()`
for every sampled token of a choice and `Request.finish()` when it ends a choice itself
(cancellation, a full context); stop strings, UTF-8 assembly, max_tokens, usage, logprobs and
finish reasons live here, once.
Chunks travel to the event loop through a thread-safe hand-off; `Request.chunks()` reads them there,
and enforces the deadline.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import DeadlineExceeded
from services.core.structured import ToolCall
from services.inference.engines.fair import ANONYMOUS, Owner
from services.inference.metrics import token_timer
from services.inference.models.grammars import CallDelta, Grammar


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters (defaults applied, validated)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None  # structured output and tool calls (services.inference.models.grammars)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log probability under the model, and the most likely alternatives."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    time_to_first_token_ms: float = 0.0
    reasoning_tokens: int = 0  # of completion_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    """A piece of one choice's text. Each choice ends with a chunk whose finish_reason is set; the
    request's very last chunk also carries the usage of all its choices."""

    text: str = ""  # the answer's content (once parsed: services.inference.chat_formats)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "tool_calls"
    usage: Usage | None = None
    index: int = 0  # the choice (n > 1)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed with this chunk
    call_deltas: list[CallDelta] = field(default_factory=list)  # pieces of calls being written
    reasoning: str = ""  # the model's thinking, apart from the content
    stop_sequence: str = ""  # finish_reason "stop": the caller's stop sequence that ended it, if one did


class StopMatcher:
    """Assembles token bytes into text and cuts it at the first stop sequence.

    Text that could be the start of a stop sequence is held back until it is known not to be."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False
        self.matched = ""  # the stop sequence that ended the text

    def feed(self, data: bytes) -> str:
        """Returns the text that is safe to emit now."""
        self._pending += self._decoder.decode(data)
        found = [(at, stop) for stop in self._stop if (at := self._pending.find(stop)) != -1]
        if found:
            at, self.matched = min(found, key=lambda pair: pair[0])
            out, self._pending, self.stopped = self._pending[:at], "", True
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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Courier:
    """Carries chunks from an engine thread to the event loops in one wake-up per batch instead of
    one per chunk (each wake-up is a write to the loop's self-pipe: ~5% of a decode thread's time
    with 8 streams)."""

    def __init__(self) -> None:
        self._parcels: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any], Any]] = []

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], item: Any) -> None:
        self._parcels.append((loop, queue, item))

    def deliver(self) -> None:
        if not self._parcels:
            return
        parcels, self._parcels = self._parcels, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for loop, queue, item in parcels:
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class LineWatch:
    """Tells waiters on event loops, from a scheduler's thread, that its line of waiting requests
    moved (one admitted or dropped, a running choice ended): queue places are pushed to those waiting,
    not polled. A line is whatever identifies its state (requests waiting, choices running)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._line: Any = None

    def listen(self) -> asyncio.Event:
        """On an event loop: an event set once the line next moves. Listen before reading a place,
        so that no move in between is missed."""
        event = asyncio.Event()
        with self._lock:
            self._listeners.append((asyncio.get_running_loop(), event))
        return event

    def tell(self, line: Any) -> None:
        """On the scheduler's thread: wakes the listeners when `line` differs from the last one told."""
        with self._lock:
            if line == self._line or not self._listeners:
                self._line = line
                return
            self._line, listeners, self._listeners = line, self._listeners, []
        for loop, event in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass


class Choice:
    """One of a request's n answers: its text assembly and token count."""

    def __init__(self, index: int, stop: Sequence[str]) -> None:
        self.index = index
        self.matcher = StopMatcher(stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []


class Request:
    """What a caller asked of an engine and what has come of it so far."""

    def __init__(self, model_id: str, prompt: list[int], sampling: Sampling, *, started: float,
                 deadline: float | None, budget: int, detokenize: Callable[[int], bytes],
                 is_end: Callable[[int], bool], n: int = 1, top_logprobs: int | None = None,
                 owner: Owner = ANONYMOUS) -> None:
        self.prompt = prompt
        self.owner = owner  # whom it runs for: its share of the engine (engines.fair)
        self.sampling = sampling
        self.started = started
        self.deadline = deadline
        self.budget = budget  # completion tokens per choice: max_tokens within the context window
        self.top_logprobs = top_logprobs  # None: no logprobs; 0..20: the sampled token and that many more
        self.choices = [Choice(i, sampling.stop) for i in range(n)]
        self.usage = Usage(prompt_tokens=len(prompt))
        self.cancelled = False  # set by the caller's side; the scheduler drops the request at its next step
        self.admitted = False  # the scheduler gave it a sequence (set on the engine's thread)
        self.courier: Courier | None = None  # set by a scheduler that delivers chunks in batches
        self._detokenize = detokenize
        self._is_end = is_end
        self._tick = token_timer(model_id)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

    # --- the engine's side (its own thread) -------------------------------------------------
    @property
    def cost(self) -> int:
        """The running slots it takes (engines.fair.Entry)."""
        return len(self.choices)

    @property
    def done(self) -> bool:
        return all(choice.finish_reason is not None for choice in self.choices)

    def token(self, index: int, token: int, logprob: TokenLogprob | None = None) -> bool:
        """One sampled token of choice `index`. True when that choice has ended with it."""
        choice = self.choices[index]
        if self.usage.completion_tokens == 0 and self.usage.time_to_first_token_ms == 0:
            self.usage.time_to_first_token_ms = (time.monotonic() - self.started) * 1000
        if self._is_end(token):
            self.finish(index, "stop")
            return True
        choice.completion_tokens += 1
        self.usage.completion_tokens += 1
        self._tick()
        if logprob is not None:
            choice.logprobs.append(logprob)
        text = choice.matcher.feed(self._detokenize(token))
        if choice.matcher.stopped:
            self._emit_text(choice, text)
            self.finish(index, "stop")
            return True
        self._emit_text(choice, text)
        if choice.completion_tokens >= self.budget:
            self.finish(index, "length")
            return True
        return False

    def finish(self, index: int, reason: str) -> None:
        choice = self.choices[index]
        if choice.finish_reason is not None:
            return
        choice.finish_reason = reason
        tail = "" if choice.matcher.stopped else choice.matcher.flush()
        usage = self.usage if self.done else None
        self._emit(Chunk(text=tail, finish_reason=reason, usage=usage, index=index, logprobs=self._take(choice),
                         stop_sequence=choice.matcher.matched))

    def fail(self, exc: BaseException) -> None:
        for choice in self.choices:
            choice.finish_reason = choice.finish_reason or "error"
        self._emit(exc)

    def _emit_text(self, choice: Choice, text: str) -> None:
        if text:
            self._emit(Chunk(text=text, index=choice.index, logprobs=self._take(choice)))

    @staticmethod
    def _take(choice: Choice) -> list[TokenLogprob]:
        taken, choice.logprobs = choice.logprobs, []
        return taken

    def _emit(self, item: Chunk | BaseException) -> None:
        if self.courier is not None:
            self.courier.post(self._loop, self._queue, item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    # --- the caller's side (the event loop) -------------------------------------------------
    async def chunks(self) -> AsyncIterator[Chunk]:
        """The request's chunks until every choice has ended. When the deadline passes first, a
        running request ends its open choices with "cancelled"; a request still waiting for a
        sequence raises DeadlineExceeded."""
        open_choices = len(self.choices)
        while open_choices:
            remaining = None if self.deadline is None else self.deadline - time.monotonic()
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=remaining)
            except TimeoutError:
                self.cancelled = True
                if not self.admitted:
                    raise DeadlineExceeded("the deadline passed while the request waited for the engine") from None
                for choice in self.choices:
                    if choice.finish_reason is None:
                        choice.finish_reason = "cancelled"
                        open_choices -= 1
                        yield Chunk(finish_reason="cancelled", index=choice.index,
                                    usage=self.usage if open_choices == 0 else None)
                return
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                open_choices -= 1
            yield item
