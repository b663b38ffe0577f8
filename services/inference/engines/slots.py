"""Engines that run one sequence per slot, each on its own worker thread (the torch engine).

A slot is one sequence's state (a KV cache) plus the tokens that state holds. A request waits for a
free slot in SlotPool, in a bounded queue (full -> RESOURCE_EXHAUSTED, HTTP 429). Among free slots
it takes the one whose cached tokens share the longest prefix with its prompt, so the next turn of a
conversation lands where its KV cache already is; ties go to the least recently used slot, which
keeps other conversations' caches warm longest. The slot's worker thread then evaluates the prompt
and feeds sampled tokens to the request until it ends or is cancelled.
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
from services.inference.engines.local import TokenEngine
from services.inference.engines.sequence import Request, Sampling, common_prefix


@dataclass
class Slot:
    index: int
    state: Any = None  # engine-specific: a torch KV cache…
    tokens: list[int] = field(default_factory=list)  # what the state holds
    last_used: float = 0.0
    busy: bool = False
    worker: "asyncio.Future[None] | None" = None  # the running generation's thread
    # Every generation of a slot runs on this one thread: native thread pools (OpenMP) keep a team
    # of threads per calling thread, and hopping threads builds extra teams that spin on the cores.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation"))


class SlotPool:
    """Which request gets which free slot, and the bounded queue of those waiting for one."""

    def __init__(self, slots: Sequence[Slot], queue_depth: int) -> None:
        self._slots = list(slots)
        self._queue_depth = queue_depth
        self._waiting = 0
        self._changed = asyncio.Condition()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return sum(slot.busy for slot in self._slots)

    def _best_free(self, prompt: Sequence[int]) -> Slot | None:
        free = [slot for slot in self._slots if not slot.busy]
        if not free:
            return None
        return max(free, key=lambda slot: (common_prefix(slot.tokens, prompt), -slot.last_used))

    def check_room(self) -> None:
        """Raises ResourceExhausted when no slot is free and the queue is full."""
        if self._waiting >= self._queue_depth and all(slot.busy for slot in self._slots):
            raise queue_full("generations", len(self._slots), self._waiting, self._queue_depth)

    async def acquire(self, prompt: Sequence[int]) -> Slot:
        async with self._changed:
            slot = self._best_free(prompt)
            if slot is None:
                self.check_room()
                self._waiting += 1
                try:
                    await self._changed.wait_for(lambda: any(not s.busy for s in self._slots))
                finally:
                    self._waiting -= 1
                slot = self._best_free(prompt)
                assert slot is not None
            slot.busy = True
            return slot

    def release(self, slot: Slot) -> None:
        """Frees the slot once its worker thread has stopped — never earlier, because a llama.cpp
        context must not be used by two threads. Synchronous, so a cancelled caller cannot skip it."""
        worker = slot.worker
        if worker is not None and not worker.done():
            worker.add_done_callback(lambda _: self._free(slot))
        else:
            self._free(slot)

    def _free(self, slot: Slot) -> None:
        slot.busy, slot.worker = False, None
        asyncio.ensure_future(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify()


class SlotEngine(TokenEngine):
    """Subclasses create `self.slots` in `_load` and implement `_decode`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots: list[Slot] = []
        self._pool: SlotPool | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        await super().load()
        self._pool = SlotPool(self.slots, self.settings.queue_depth)

    async def close(self) -> None:
        # A cancelled generation's worker may still be finishing its last token.
        await asyncio.gather(*(slot.worker for slot in self.slots if slot.worker is not None), return_exceptions=True)
        await super().close()

    def _close(self) -> None:
        self.slots = []

    @property
    def running(self) -> int:
        return self._pool.running if self._pool is not None else 0

    @property
    def waiting(self) -> int:
        return self._pool.waiting if self._pool is not None else 0

    def info(self) -> dict[str, Any]:
        return {**super().info(), "slots": len(self.slots)}

    @abstractmethod
    def _decode(self, slot: Slot, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """Evaluates `prompt` in `slot` and yields sampled tokens. It reuses what the slot holds
        unless slot.tokens is empty, and leaves slot.tokens equal to what its state holds."""

    def _submit(self, request: Request) -> None:
        self._pool.check_room()  # ResourceExhausted now, while the caller can still get a 429
        task = asyncio.ensure_future(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: Request) -> None:
        try:
            slot = await self._pool.acquire(request.prompt)
        except BaseException as exc:  # noqa: BLE001 - the caller's stream raises it
            request.fail(exc)
            return
        if request.cancelled:
            self._pool.release(slot)
            return
        request.admitted = True
        slot.worker = asyncio.get_running_loop().run_in_executor(slot.executor, self._run, slot, request)
        self._pool.release(slot)  # frees the slot once the worker has stopped

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

