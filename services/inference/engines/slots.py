"""Engines that run one sequence per slot, each on its own worker thread (the torch engine).

A slot is one sequence's state (a KV cache) plus the tokens that state holds. A request waits for a
free slot in SlotPool, in a bounded queue (full -> RESOURCE_EXHAUSTED, HTTP 429); a freed slot goes
to the waiting request engines.fair's policy picks (users in turn; a running generation is never
paused here: a slot's worker holds it until its answer ends). Among free slots
it takes the one whose cached tokens share the longest prefix with its prompt, so the next turn of a
conversation lands where its KV cache already is; ties go to the least recently used slot, which
keeps other conversations' caches warm longest. The slot's worker thread then evaluates the prompt
and feeds sampled tokens to the request until it ends or is cancelled. Requests waiting are told
their place in line each time it moves (queue_place, line_moved), as in the batched engine.

The remote engine (engines.remote) bounds its requests in flight with the same pool: its slots hold
no state (an in-flight place each; its prompts are (), so a free one is the least recently used), and
its requests give their place back however they end (SlotPool.withdraw).
"""

from __future__ import annotations

import asyncio
import time
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from services.inference.engines.base import EngineError, queue_full
from services.inference.engines.fair import ANONYMOUS, Line, Owner, Policy, Shares
from services.inference.engines.local import TokenEngine
from services.inference.engines.sequence import LineWatch, Request, Sampling, common_prefix


@dataclass
class Slot:
    index: int
    state: Any = None  # engine-specific: a torch KV cache…
    tokens: list[int] = field(default_factory=list)  # what the state holds
    last_used: float = 0.0
    busy: bool = False
    owner: Owner = ANONYMOUS  # whom its running generation is for (engines.fair)
    taken_at: float = 0.0  # when its running generation took it
    worker: "asyncio.Future[None] | None" = None  # the running generation's thread
    # Every generation of a slot runs on this one thread: native thread pools (OpenMP) keep a team
    # of threads per calling thread, and hopping threads builds extra teams that spin on the cores.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation"))


@dataclass(eq=False)
class _Waiter:
    owner: Owner
    prompt: Sequence[int]
    slot: "asyncio.Future[Slot]"
    key: object = None  # what the waiter's queue place is asked by (the engine's Request)
    withdrawn: bool = False  # its place or slot was given back (SlotPool.withdraw)
    cost = 1


class SlotPool:
    """Which request gets which free slot, and the bounded queue of those waiting for one."""

    def __init__(self, slots: Sequence[Slot], queue_depth: int, fair: bool = True) -> None:
        self._slots = list(slots)
        self._queue_depth = queue_depth
        self._line: Line[_Waiter] = Line(Policy(fair, len(self._slots), queue_depth))
        self.line_watch = LineWatch()  # told whenever the line moves: queue places are pushed
        # How long a slot is held (moving average): what queue places' waits are estimated from.
        self._held_seconds: float | None = None

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def running(self) -> int:
        return sum(slot.busy for slot in self._slots)

    def _best_free(self, prompt: Sequence[int]) -> Slot | None:
        free = [slot for slot in self._slots if not slot.busy]
        if not free:
            return None
        return max(free, key=lambda slot: (common_prefix(slot.tokens, prompt), -slot.last_used))

    def _running(self) -> Shares:
        return Shares((slot.owner, 1) for slot in self._slots if slot.busy)

    def check_room(self, owner: Owner = ANONYMOUS) -> None:
        """Raises ResourceExhausted when no slot is free and the queue has no room for the owner."""
        if not self._line.fits(owner, 1, self._running()):
            raise queue_full("generations", self.running, self.waiting, self._queue_depth)

    def enqueue(self, prompt: Sequence[int], owner: Owner = ANONYMOUS, key: object = None) -> _Waiter:
        """A waiter for a slot, given one at once when one is free and nobody waits, else in line;
        raises ResourceExhausted when the queue has no room for the owner."""
        waiter = _Waiter(owner, prompt, asyncio.get_running_loop().create_future(), key)
        slot = self._best_free(prompt) if not self._line else None
        if slot is not None:
            waiter.slot.set_result(self._take(slot, owner))
            return waiter
        self.check_room(owner)
        self._line.add(waiter)
        self._hand_out()  # a slot may be free with others waiting: the policy says who takes it
        self._moved()
        return waiter

    async def wait(self, waiter: _Waiter) -> Slot:
        try:
            return await waiter.slot
        except asyncio.CancelledError:
            self.withdraw(waiter)
            raise

    def withdraw(self, waiter: _Waiter) -> None:
        """The waiter's request is over, however it ended: its place in line, or the slot it was
        handed (even as it was cancelled), goes to the next. Once: a second call does nothing."""
        if waiter.withdrawn:
            return
        waiter.withdrawn = True
        if waiter.slot.done() and not waiter.slot.cancelled() and waiter.slot.exception() is None:
            self.release(waiter.slot.result())
            return
        waiter.slot.cancel()
        self._leave(waiter)

    def refuse(self, waiter: _Waiter, error: BaseException) -> None:
        """Takes a waiter out of line with `error` (its deadline passed), unless it has its slot."""
        if not waiter.slot.done():
            waiter.slot.set_exception(error)
            self._leave(waiter)

    def _leave(self, waiter: _Waiter) -> None:
        if waiter in self._line.entries:
            self._line.remove(waiter)
            self._moved()

    async def acquire(self, prompt: Sequence[int], owner: Owner = ANONYMOUS, key: object = None) -> Slot:
        return await self.wait(self.enqueue(prompt, owner, key))

    def _moved(self) -> None:
        self.line_watch.tell((len(self._line), self.running))

    def place(self, key: object) -> tuple[int, float] | None:
        """Where the waiter for `key` is: (place in line, 1 first; estimated seconds until it gets a
        slot), or None when it does not wait."""
        waiter = next((w for w in self._line.entries if w.key is key), None)
        ahead = self._line.ahead(waiter, self._running()) if waiter is not None else None
        if ahead is None:
            return None
        place = self.running + ahead + 1 - len(self._slots)
        if place <= 0:
            return None
        return place, place * (self._held_seconds or 0.0) / len(self._slots)

    def _take(self, slot: Slot, owner: Owner) -> Slot:
        slot.busy, slot.owner, slot.taken_at = True, owner, time.monotonic()
        return slot

    def _hand_out(self) -> None:
        """Gives free slots to the waiters the policy picks."""
        while (waiter := self._line.next(self._running())) is not None:
            slot = self._best_free(waiter.prompt)
            if slot is None:
                return
            self._line.remove(waiter)
            if not waiter.slot.done():
                waiter.slot.set_result(self._take(slot, waiter.owner))
            self._moved()

    def release(self, slot: Slot) -> None:
        """Frees the slot once its worker thread has stopped — never earlier, because a llama.cpp
        context must not be used by two threads. Synchronous, so a cancelled caller cannot skip it."""
        worker = slot.worker
        if worker is not None and not worker.done():
            worker.add_done_callback(lambda _: self._free(slot))
        else:
            self._free(slot)

    def _free(self, slot: Slot) -> None:
        held = time.monotonic() - slot.taken_at
        self._held_seconds = held if self._held_seconds is None else 0.8 * self._held_seconds + 0.2 * held
        # Its successor is the waiter the line put first while it ran (its owner still counted): the
        # places told stay true, and a user whose request ended does not win the slot back from
        # another user's older waiter on a tie (with one slot users would go in arrival order).
        successor = self._line.next(self._running())
        slot.busy, slot.worker, slot.owner = False, None, ANONYMOUS
        if successor is not None:
            self._line.remove(successor)
            if not successor.slot.done():
                successor.slot.set_result(self._take(slot, successor.owner))
        self._hand_out()
        self._moved()


class InLine:
    """What an engine whose requests wait in a SlotPool (`_slot_pool`, once loaded) says: what runs
    and waits (metrics, admin), and when its line moves (queue places)."""

    _slot_pool: SlotPool | None = None

    @property
    def running(self) -> int:
        return self._slot_pool.running if self._slot_pool is not None else 0

    @property
    def waiting(self) -> int:
        return self._slot_pool.waiting if self._slot_pool is not None else 0

    def queue_place(self, key: object) -> tuple[int, float] | None:
        """Where the request waiting as `key` stands (SlotPool.place)."""
        return self._slot_pool.place(key) if self._slot_pool is not None else None

    def line_moved(self) -> asyncio.Event | None:
        return self._slot_pool.line_watch.listen() if self._slot_pool is not None else None


class SlotEngine(InLine, TokenEngine):
    """Subclasses create `self.slots` in `_load` and implement `_decode`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots: list[Slot] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        await super().load()
        self._slot_pool = SlotPool(self.slots, self.settings.queue_depth, self.settings.fair_share)

    async def close(self) -> None:
        # A cancelled generation's worker may still be finishing its last token.
        await asyncio.gather(*(slot.worker for slot in self.slots if slot.worker is not None), return_exceptions=True)
        await super().close()

    def _close(self) -> None:
        self.slots = []

    def info(self) -> dict[str, Any]:
        return {**super().info(), "slots": len(self.slots)}

    @abstractmethod
    def _decode(self, slot: Slot, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """Evaluates `prompt` in `slot` and yields sampled tokens. It reuses what the slot holds
        unless slot.tokens is empty, and leaves slot.tokens equal to what its state holds."""

    def _submit(self, request: Request) -> None:
        # In line (or holding a slot) when this returns, so that its queue place can be read at once;
        # ResourceExhausted now, while the caller can still get a 429.
        waiter = self._slot_pool.enqueue(request.prompt, request.owner, key=request)
        task = asyncio.ensure_future(self._serve(request, waiter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: Request, waiter: _Waiter) -> None:
        try:
            slot = await self._slot_pool.wait(waiter)
        except BaseException as exc:  # noqa: BLE001 - the caller's stream raises it
            request.fail(exc)
            return
        if request.cancelled:
            self._slot_pool.release(slot)
            return
        request.admitted = True
        slot.worker = asyncio.get_running_loop().run_in_executor(slot.executor, self._run, slot, request)
        self._slot_pool.release(slot)  # frees the slot once the worker has stopped

    def _run(self, slot: Slot, request: Request) -> None:
        try:
            if request.sampling.seed is not None:
                # A seed promises repeatable output, and logits from a cached prefix differ in the
                # last bits from a fresh prefill: seeded requests always evaluate the whole prompt.
                slot.tokens = []
            prompt = request.prompt
            request.usage.cached_prompt_tokens = max(0, min(common_prefix(slot.tokens, prompt), len(prompt) - 1))
            tokens = self._decode(slot, prompt, request.sampling)
            try:
                for token in tokens:
                    if request.cancelled:
                        request.finish(0, "cancelled")
                        break
                    if request.token(0, token):
                        break
            finally:
                tokens.close()  # lets the engine record what its KV cache now holds
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, raised there
            request.fail(exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}"))
        finally:
            slot.last_used = time.monotonic()

