"""The batch scheduler's (engines.batch) KV memory: which sequence a new prompt lands on, and where
idle conversations' KV state goes when their cells are needed.

A prompt takes the sequence whose cells share the longest prefix with it (a conversation's next turn
lands where its previous turn is), or a copy of a shared prefix from another sequence
(`llama_memory_seq_cp`), or its conversation's parked state restored from host RAM or from disk,
whichever holds the most of it. A sequence emptied for another prompt is parked in host RAM first
(`llama_state_seq_get_data`, engines.kv_store.HostKvStore) and written to disk when a directory is
set (engines.kv_store.DiskKvStore); conversations idle while nothing runs go to disk too, so that a
restart finds them.

BatchScheduler derives from SequenceMemory; only its decode thread calls these methods.
"""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING, Any

from services.core.errors import ResourceExhausted
from services.inference.engines.decoding import Decoding, KvSequence
from services.inference.engines.kv_store import DiskKvStore, HostKvStore
from services.inference.engines.sequence import common_prefix

if TYPE_CHECKING:
    import collections

    from services.inference.engines.fair import Line
    from services.inference.engines.sequence import Request

MIN_SHARED_PREFIX = 8  # fewer shared tokens than this are cheaper to evaluate than to copy
MIN_PARKED_TOKENS = 32  # shorter sequences are not worth parking in host RAM
# Every decoded token attends over the cells up to the highest one in use, whichever sequence holds
# them (llama.cpp masks the others, which still costs): measured on 2 cores, 8,000 cells held by
# idle conversations slowed a single stream from ~110 to ~87 tok/s. Parley's patch to llama.cpp
# (rows visit only the cells they see) leaves less of that, not all: after a 60-turn conversation,
# 1, 4 and 8 streams ran at 80, 110 and 170 tok/s with its ~3,500 cells kept warm, against 89, 123
# and 192 with it parked. Idle conversations beyond this many cells are parked in host RAM, from
# where their next turn restores them in milliseconds.
WARM_IDLE_CELLS = 512
PARK_AFTER_SECONDS = 1.0  # a conversation between two quick turns stays where it is
SAVE_AFTER_SECONDS = 2.0  # an idle conversation is saved to disk once nothing has run for this long


class SequenceMemory:
    """What BatchScheduler sets up for its KV memory (see its __init__)."""

    _l: Any
    _ctx: Any
    _memory: Any
    _sequences: list[KvSequence]
    _host: HostKvStore
    _disk: DiskKvStore | None
    _pending: Line[Request | Decoding]
    _closing: bool
    stats: collections.Counter[str]

    def _sequence_for(self, prompt: list[int] | None) -> tuple[KvSequence, int]:
        """A sequence for a new prompt, holding its longest available prefix (never all of it: the
        last prompt token is evaluated for its logits). Marks it busy."""
        if prompt is None:
            seq = self._victim(None)
            self._clear(seq)
            seq.busy = True
            return seq, 0
        limit = len(prompt) - 1
        k, source = max(((min(common_prefix(s.tokens, prompt), limit), s) for s in self._sequences),
                        key=lambda match: (match[0], -match[1].busy, match[1].last_used))
        # The same conversation (the new prompt holds the sequence's whole last prompt): continue it.
        # A shorter match (a system prompt that several conversations share) is copied instead,
        # which keeps the other conversation warm.
        if not source.busy and k >= MIN_SHARED_PREFIX and k >= min(source.prompt_len, limit):
            self._truncate(source, k)
            source.busy = True
            self.stats["reused"] += k
            return source, k
        parked, parked_k = self._host.best(prompt)
        parked_k = min(parked_k, limit)
        target = self._victim(source if k >= MIN_SHARED_PREFIX else None)
        saved, saved_k = self._disk.best(prompt, max(k, parked_k)) if self._disk is not None else (None, 0)
        saved_k = min(saved_k, limit)
        if saved is not None and saved_k > max(k, parked_k) and saved_k >= MIN_SHARED_PREFIX:
            data = self._disk.load(saved)  # type: ignore[union-attr]
            if data is not None and self._restore(target, saved.tokens, data, saved_k):
                target.saved = len(target.tokens)
                self.stats["restored_from_disk"] += 1
                return target, saved_k
        if parked is not None and parked_k > k and parked_k >= MIN_SHARED_PREFIX:
            tokens, data = self._host.take(parked)
            if self._restore(target, tokens, data, parked_k):
                return target, parked_k
        self._clear(target)
        if k >= MIN_SHARED_PREFIX:
            self._l.llama_memory_seq_cp(self._memory, source.id, target.id, 0, k)
            target.tokens = prompt[:k]
            self.stats["copied"] += 1
            self.stats["reused"] += k
        target.busy = True
        return target, len(target.tokens)

    def _restore(self, target: KvSequence, tokens: list[int], data: Any, keep: int) -> bool:
        """Loads a parked state into `target` and keeps its first `keep` tokens. False when the
        cache has no room for it (the prompt is evaluated instead)."""
        self._clear(target)
        if self._l.llama_state_seq_set_data(self._ctx, data, len(data), target.id):
            target.tokens = list(tokens)
            self._truncate(target, keep)
            target.busy = True
            self.stats["restored"] += 1
            self.stats["reused"] += keep
            return True
        self._l.llama_memory_seq_rm(self._memory, target.id, -1, -1)
        return False

    def _victim(self, keep: KvSequence | None) -> KvSequence:
        """An idle sequence to reuse: an empty one if any, else the least recently used."""
        idle = [s for s in self._sequences if not s.busy and s is not keep]
        if not idle:
            raise ResourceExhausted("every sequence of the model is busy; retry shortly", retry_after=1)
        return min(idle, key=lambda s: (bool(s.tokens), s.last_used))

    def _truncate(self, seq: KvSequence, keep: int) -> None:
        if keep < len(seq.tokens):
            self._l.llama_memory_seq_rm(self._memory, seq.id, keep, -1)
            del seq.tokens[keep:]
            seq.saved = 0

    def _clear(self, seq: KvSequence) -> None:
        """Empties a sequence, parking its KV state in host RAM first when it is worth keeping."""
        if not seq.tokens:
            seq.saved = 0
            return
        data = self._state(seq) if self._host.budget > 0 else None
        if data is not None and len(data) <= self._host.budget:
            self._host.put(list(seq.tokens), data)
            self.stats["parked"] += 1
        self._save(seq, data)
        self._l.llama_memory_seq_rm(self._memory, seq.id, -1, -1)
        seq.tokens = []
        seq.saved = 0

    def _state(self, seq: KvSequence) -> Any | None:
        """A copy of the sequence's KV state, if it is worth keeping."""
        return self._copy_state(seq) if len(seq.tokens) >= MIN_PARKED_TOKENS else None

    def _copy_state(self, seq: KvSequence) -> Any | None:
        """A copy of the sequence's KV state (llama_state_seq_get_data); None if llama.cpp gives none."""
        size = self._l.llama_state_seq_get_size(self._ctx, seq.id) if seq.tokens else 0
        data = (ctypes.c_uint8 * size)() if size > 0 else None
        if data is None or self._l.llama_state_seq_get_data(self._ctx, data, size, seq.id) != size:
            return None
        return data

    def _save(self, seq: KvSequence, data: Any | None = None, wait: float = 0.0) -> None:
        """Queues the sequence's state for the disk writer unless the disk has it already; the
        decode thread only copies it (`data`, when the caller has the copy)."""
        if self._disk is None or seq.saved == len(seq.tokens) or len(seq.tokens) < MIN_PARKED_TOKENS:
            return
        data = data if data is not None else self._state(seq)
        if data is not None and self._disk.save(seq.tokens, data, wait):
            seq.saved = len(seq.tokens)
            self.stats["saved"] += 1

    def _save_idle(self) -> None:
        """While nothing runs: saves the idle conversations not yet on disk, until a request comes."""
        quiet_since = time.monotonic() - SAVE_AFTER_SECONDS
        unsaved = [s for s in self._sequences if not s.busy and s.saved != len(s.tokens) and s.last_used <= quiet_since]
        for seq in sorted(unsaved, key=lambda s: -s.last_used):
            if self._pending or self._closing:
                return
            self._save(seq)

    def _park_idle(self) -> None:
        """Parks the least recently used conversation idle for PARK_AFTER_SECONDS if idle ones hold
        more than WARM_IDLE_CELLS cells (only when there is a host store to park it in). One a step:
        each costs the running choices a copy of its state, and a round of conversations that ended
        together must not stall the next round's first step by the sum of them."""
        if self._host.budget <= 0:
            return
        idle = [s for s in self._sequences if not s.busy and s.tokens]
        if sum(len(s.tokens) for s in idle) <= WARM_IDLE_CELLS:
            return
        oldest = min(idle, key=lambda s: s.last_used)
        if oldest.last_used <= time.monotonic() - PARK_AFTER_SECONDS:
            self._clear(oldest)
