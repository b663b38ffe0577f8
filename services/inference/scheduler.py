"""Slot scheduling for engines with one sequence per slot (services.inference.engines.slots).

A request waits for a free slot in a bounded queue (full -> RESOURCE_EXHAUSTED, HTTP 429). Among
free slots it takes the one whose cached tokens share the longest prefix with its prompt, so the
next turn of a conversation lands where its KV cache already is; ties go to the least recently
used slot, which keeps other conversations' caches warm longest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.core.errors import ResourceExhausted
from services.inference.engines.sequence import common_prefix

if TYPE_CHECKING:
    from services.inference.engines.slots import Slot


class SlotPool:
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
            raise ResourceExhausted(
                f"the server is busy: {len(self._slots)} generations running and "
                f"{self._waiting} queued (queue depth {self._queue_depth}); retry shortly",
                retry_after=1,
            )

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
