"""A stand-in for llama.cpp under the batch scheduler (engines.batch): it keeps each sequence's KV
cells as a list of tokens, checks that every batch continues its sequence where its cells end, and
"samples" a token computed from all of a sequence's cells, so that an answer's tokens show whether
its KV history came through intact (paused, parked, restored) or not."""

from __future__ import annotations

import collections
from typing import Any
from unittest import mock

from services.inference.engines.batch import BatchScheduler
from services.inference.engines.batch_sampling import Samplers
from services.inference.models.hardware import EngineSettings


class _Batch:
    def __init__(self, size: int) -> None:
        self.token = [0] * size
        self.pos = [0] * size
        self.n_seq_id = [0] * size
        self.seq_id = [[0] for _ in range(size)]
        self.logits = [False] * size
        self.n_tokens = 0


class FakeLlama:
    def __init__(self) -> None:
        self.kv: dict[int, list[int]] = collections.defaultdict(list)
        self.rows: dict[int, int] = {}  # output row -> sequence of the last decode
        self.decoded = 0  # tokens evaluated, all steps

    # --- what engines.batch calls ------------------------------------------------------------
    def llama_get_memory(self, ctx: Any) -> str:
        return "memory"

    def llama_batch_init(self, size: int, embd: int, n_seq: int) -> _Batch:
        return _Batch(size)

    def llama_batch_free(self, batch: _Batch) -> None:
        pass

    def llama_decode(self, ctx: Any, batch: _Batch) -> int:
        self.rows = {}
        for i in range(batch.n_tokens):
            seq = batch.seq_id[i][0]
            assert batch.pos[i] == len(self.kv[seq]), "a batch must continue its sequence where its cells end"
            self.kv[seq].append(batch.token[i])
            if batch.logits[i]:
                self.rows[i] = seq
        self.decoded += batch.n_tokens
        return 0

    def llama_memory_seq_rm(self, memory: Any, seq: int, start: int, end: int) -> bool:
        cells = self.kv[seq]
        del cells[max(start, 0): None if end < 0 else end]
        return True

    def llama_memory_seq_cp(self, memory: Any, src: int, dst: int, start: int, end: int) -> None:
        self.kv[dst] = list(self.kv[src][: None if end < 0 else end])

    def llama_state_seq_get_size(self, ctx: Any, seq: int) -> int:
        return 2 * len(self.kv[seq])

    def llama_state_seq_get_data(self, ctx: Any, data: Any, size: int, seq: int) -> int:
        for i, token in enumerate(self.kv[seq]):
            data[2 * i], data[2 * i + 1] = token // 256, token % 256
        return size

    def llama_state_seq_set_data(self, ctx: Any, data: Any, size: int, seq: int) -> int:
        self.kv[seq] = [data[2 * i] * 256 + data[2 * i + 1] for i in range(size // 2)]
        return size

    # --- the "model" -------------------------------------------------------------------------
    def next_token(self, row: int) -> int:
        cells = self.kv[self.rows[row]]
        return 3 + sum((i + 1) * t for i, t in enumerate(cells)) % 997


class FakeSampling:
    """engines.batch_sampling.ChoiceSampling's part that the scheduler uses for plain choices."""

    def __init__(self, llama: FakeLlama, *args: Any) -> None:
        self._llama = llama

    def samplers(self, request: Any, index: int) -> Samplers:
        return Samplers(None)

    def pick(self, request: Any, made: Samplers, i: int) -> int:
        return self._llama.next_token(i)


def scheduler(*, slots: int = 2, fair: bool = True, queue_depth: int = 4, batch_tokens: int = 64,
              resident: int = 6, spare: int | None = None) -> tuple[BatchScheduler, FakeLlama]:
    """A BatchScheduler over FakeLlama; the test drives it with `_step()` (no thread). `spare`: the
    choices beyond `slots` kept for newcomers (default: the engine's own, 1 with fair share)."""
    llama = FakeLlama()
    settings = EngineSettings("llama.cpp", "cpu", 1, 0, "float32", "none", 1024, slots, queue_depth=queue_depth,
                              fair_share=fair, resident_sequences=resident, batch_tokens=batch_tokens)
    with mock.patch("services.inference.engines.batch.ChoiceSampling", lambda *args: FakeSampling(llama)):
        batch = BatchScheduler(llama, object(), lambda token, special: b"", vocab=None, n_vocab=1000,
                               settings=settings, host_cache_bytes=1 << 20, name="fake")
    if spare is not None:
        batch._spare = spare
    return batch, llama
