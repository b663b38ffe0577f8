"""The batch scheduler's (engines.batch) admission: its line of waiting requests under engines.fair's
policy, the queue bound and queue places read from that line, and pausing a running choice for
another user's request.

BatchScheduler derives from Admission; the decode thread calls `_drop_cancelled` and `_admit` at
the start of each step, the event loop `submit` and `queue_place`.

A spare (fair share, when no slot is free): a user that runs nothing starts at once on one of a few
choices beyond parallel_slots (`_spare_for`); pausing is for when those are taken.

Pausing (fair share, when no slot is free and one user runs more than a waiting user would): the
most loaded user's most recently admitted single choice gives its sequence up. Its KV state is
copied to host RAM with llama.cpp's `llama_state_seq_get_data` (as engines.batch parks idle
conversations, but held by the paused choice itself rather than in the evictable HostKvStore:
nothing of it may be lost) and it waits in line in front of its user's new requests, its sampler,
sampled token and unevaluated text kept. Resumed, the state goes back with
`llama_state_seq_set_data` and decoding goes on where it stopped; only if the state no longer fits
the KV cache are its tokens evaluated again. The stream sees a pause, nothing else.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from services.core.errors import ResourceExhausted
from services.inference.engines.base import queue_full
from services.inference.engines.decoding import Decoding, KvSequence
from services.inference.engines.fair import Line, Policy, Shares
from services.inference.engines.sequence import Courier, Request

if TYPE_CHECKING:
    import collections


class Admission:
    """What BatchScheduler sets up for its admission (see its __init__)."""

    _l: Any
    _ctx: Any
    _memory: Any
    _sequences: list[KvSequence]
    _cond: threading.Condition
    _closing: bool
    _policy: Policy
    _pending: Line[Request | Decoding]
    _placing: Request | Decoding | None  # taken from the line and not yet running (counted as running meanwhile)
    _active: list[Decoding]
    _courier: Courier
    _max_running: int
    _spare: int  # choices beyond _max_running for users that run nothing (fair share, _spare_for)
    _queue_depth: int
    _answer_seconds: float | None
    _step_seconds: float
    stats: collections.Counter[str]

    if TYPE_CHECKING:  # BatchScheduler's own
        running: int

        def _choices(self) -> int: ...
        def _place(self, request: Request) -> None: ...
        def _victim(self, keep: KvSequence | None) -> KvSequence: ...
        def _clear(self, seq: KvSequence) -> None: ...
        def _copy_state(self, seq: KvSequence) -> Any | None: ...

    # --- the event loop's side -------------------------------------------------------------
    def queue_place(self, request: Request) -> tuple[int, float] | None:
        """Where a submitted request waits: its place in line (1: it starts when one running choice
        ends) and the estimated seconds until it starts; None once it runs or will at the next step.
        Admission follows the policy's line (_admit), so the place is the choices ahead of it in that
        line or running, beyond the room parallel_slots gives."""
        with self._cond:
            running = self._shares()
            ahead = self._pending.ahead(request, running)
            if ahead is None or (ahead == 0 and (self._policy.victim(request.owner, request.cost, running)
                                                 or self._spare_for(request, running))):
                return None
            placing = self._placing.cost if self._placing is not None else 0
            place = self._choices() + placing + ahead + request.cost - self._max_running
            if place <= 0:
                return None
        answer = self._answer_seconds
        if answer is None:  # no answer has ended yet: the longest a running one may take, at the step rate
            answer = max([request.budget, *(d.request.budget for d in list(self._active))]) * self._step_seconds
        return place, place * answer / self._max_running

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closing:
                raise ResourceExhausted("the model is unloading; retry shortly", retry_after=1)
            # Everything accepted and not yet finished, running, being placed or waiting, against the
            # room for it; counted here rather than after admission, which happens on the decode thread
            # later. The one being placed is in neither list meanwhile: left out, a request arriving
            # then would take its room (a flood got one entry more than its share on a loaded machine).
            held = self._shares()
            if self._placing is not None:
                held.add(self._placing.owner, self._placing.cost)
            if not self._pending.fits(request.owner, request.cost, held):
                raise queue_full("generations", self.running, len(self._pending), self._queue_depth)
            self._pending.add(request)
            self._cond.notify()

    # --- the decode thread ------------------------------------------------------------------
    def _shares(self) -> Shares:
        """The running choices of each owner (engines.fair)."""
        return Shares((d.owner, (d.request.choices[d.index].finish_reason is None) + len(d.followers))
                      for d in list(self._active))

    @staticmethod
    def _request_of(entry: Request | Decoding) -> Request:
        return entry if isinstance(entry, Request) else entry.request

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = self._pending.drop(lambda e: self._request_of(e).cancelled)
        for paused in dropped:
            if not isinstance(paused, Request):
                paused.request.finish(paused.index, "cancelled")
                paused.samplers.free(self._l)
        for d in [d for d in self._active if d.request.cancelled]:
            d.request.finish(d.index, "cancelled")
            self._end(d)

    def _admit(self) -> None:
        while True:
            with self._cond:
                running = self._shares()
                head = self._pending.next(running)
                if head is None:
                    return
                # A request with more choices than parallel_slots runs alone rather than never.
                room = (not self._active or self._choices() + head.cost <= self._max_running
                        or self._spare_for(head, running))
                if room:
                    self._pending.remove(head)
                    # Neither waiting nor running until placed: places read meanwhile count it as running.
                    self._placing = head
            if not room:
                # No room: a lighter user's request takes a choice of the most loaded user, who waits.
                victim = self._policy.victim(head.owner, head.cost, self._shares())
                if victim is None or not self._pause(victim):
                    return
                continue
            try:
                if isinstance(head, Request):
                    head.courier = self._courier
                    self._place(head)
                else:
                    self._resume(head)
            except Exception as exc:  # noqa: BLE001 - the caller's stream raises it
                self._request_of(head).fail(exc)
                if not isinstance(head, Request):
                    head.samplers.free(self._l)
            finally:
                with self._cond:
                    self._placing = None

    def _spare_for(self, entry: Request | Decoding, running: Shares) -> bool:
        """Whether a user that runs nothing starts beyond parallel_slots, on one of the `_spare` choices
        fair share keeps for newcomers, rather than by pausing another user's choice: a paused stream
        finishes late, and a flood's last streams then decode in a thin batch. The total falls back
        under parallel_slots as choices end: only users that run nothing take a spare."""
        if running.users[entry.owner.user] or self._choices() + entry.cost > self._max_running + self._spare:
            return False
        return sum(not s.busy for s in self._sequences) >= entry.cost  # sequence ids beyond the running ones

    def _started(self, d: Decoding) -> None:
        """`d` (and its followers) run from the next step: it counts as running from the moment it is no
        longer counted as being placed, so that no place read meanwhile moves back."""
        with self._cond:
            self._active.append(d)
            self._placing = None

    # --- pausing a choice for another user's request (engines.fair) ------------------------------
    def _pause(self, user: str) -> bool:
        """Pauses the user's most recently admitted single choice: its KV state goes to host RAM (not
        the evictable HostKvStore: nothing of it may be lost) and its sequence is freed; it waits in
        line, in front of its user's new requests. False when the user has no choice to pause."""
        running = [d for d in self._active if d.owner.user == user and len(d.request.choices) == 1
                   and not d.followers and d.request.choices[0].finish_reason is None]
        if not running:
            return False
        d = max(running, key=lambda d: d.admitted_at)
        seq = d.seq
        d.parked = (list(seq.tokens), self._copy_state(seq))  # no state: resumed by evaluating its tokens again
        with self._cond:  # at once, so that a request submitted meanwhile counts it (submit)
            self._active.remove(d)
            self._pending.put_back(d)
        self._l.llama_memory_seq_rm(self._memory, seq.id, -1, -1)
        seq.tokens, seq.busy, seq.last_used = [], False, time.monotonic()
        self.stats["paused"] += 1
        return True

    def _resume(self, d: Decoding) -> None:
        """Puts a paused choice back on a sequence with its KV state, where it goes on decoding."""
        assert d.parked is not None
        (tokens, data), d.parked = d.parked, None
        seq = self._victim(None)
        self._clear(seq)
        if data is not None and self._l.llama_state_seq_set_data(self._ctx, data, len(data), seq.id):
            seq.tokens = tokens
        else:  # its state did not fit back: its tokens are evaluated again, the answer goes on as it was
            self._l.llama_memory_seq_rm(self._memory, seq.id, -1, -1)
            d.todo = tokens + ([d.next_token] if d.next_token is not None else []) + d.todo
            d.next_token = None
            self.stats["recomputed"] += 1
        seq.prompt_len, seq.busy = d.seq.prompt_len, True
        d.seq = seq
        self._started(d)
        self.stats["resumed"] += 1

