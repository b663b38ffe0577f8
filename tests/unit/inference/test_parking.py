"""When the batch scheduler parks idle conversations in host RAM (engines.batch_memory): only once
idle ones hold more than WARM_IDLE_CELLS cells, the least recently used first, idle for
PARK_AFTER_SECONDS, and one a step."""

from __future__ import annotations

import time

from services.inference.engines import batch_memory
from services.inference.engines.batch_memory import PARK_AFTER_SECONDS, WARM_IDLE_CELLS, SequenceMemory
from services.inference.engines.decoding import KvSequence
from services.inference.engines.kv_store import HostKvStore


class Memory(SequenceMemory):
    """SequenceMemory's parking over plain sequences; _clear records what it parks."""

    def __init__(self, sequences: list[KvSequence], host_budget: int = 2**20) -> None:
        self._sequences = sequences
        self._host = HostKvStore(host_budget)
        self.parked: list[int] = []

    def _clear(self, seq: KvSequence) -> None:
        self.parked.append(seq.id)
        seq.tokens = []


def idle(i: int, cells: int, idle_for: float) -> KvSequence:
    return KvSequence(i, list(range(cells)), last_used=time.monotonic() - idle_for)


def test_idle_conversations_within_the_warm_cells_stay() -> None:
    memory = Memory([idle(0, WARM_IDLE_CELLS // 2, 60), idle(1, WARM_IDLE_CELLS // 2, 60)])
    memory._park_idle()
    assert memory.parked == []


def test_beyond_the_warm_cells_the_least_recently_used_goes_one_a_step() -> None:
    cells = WARM_IDLE_CELLS // 4
    sequences = [idle(i, cells, 60 - i) for i in range(8)]  # 0 idle the longest
    sequences.append(KvSequence(8, list(range(cells * 4)), busy=True))  # running: never parked, not counted
    memory = Memory(sequences)
    memory._park_idle()
    assert memory.parked == [0]  # one a step, however many are over
    for _ in range(10):
        memory._park_idle()
    assert memory.parked == [0, 1, 2, 3]  # until the idle ones hold no more than WARM_IDLE_CELLS


def test_a_conversation_between_two_quick_turns_stays() -> None:
    memory = Memory([idle(0, WARM_IDLE_CELLS, PARK_AFTER_SECONDS / 2), idle(1, WARM_IDLE_CELLS, 0)])
    memory._park_idle()
    assert memory.parked == []


def test_without_a_host_store_nothing_is_parked(monkeypatch) -> None:
    monkeypatch.setattr(batch_memory, "WARM_IDLE_CELLS", 0)
    memory = Memory([idle(0, 100, 60)], host_budget=0)
    memory._park_idle()
    assert memory.parked == []
