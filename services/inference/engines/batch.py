"""Continuous batching over one llama.cpp context: chunked prefill, per-choice sampling and drafts
in one decode step; admission (engines.batch_admission) and KV memory (engines.batch_memory) apart.

One thread runs `BatchScheduler._loop`. Each step:
1. drops cancelled requests (their sequences stop at once: at most one decode step later);
2. admits waiting requests while fewer than `parallel_slots` choices run, in the order of
   engines.fair's policy (users in turn; with no room, a user that runs nothing starts on a spare
   choice, else a choice of the most loaded user pauses for a lighter user's request), placing each where the most of its prompt is already held;
3. builds one batch: the last sampled token of every decoding choice, then prompt chunks of the
   admitted requests under the step's token budget, split between users by engines.fair (a long
   prompt never stalls the running streams for more than one budget's worth of prefill);
4. decodes it once and samples each choice from its own logits row with its own sampler chain;
   n > 1 choices fork after their shared prompt (`llama_memory_seq_cp`) and each samples the same
   row with a differently seeded chain. Text that a grammar dictates (the head of a tool call) is
   not sampled token by token: its tokens join the next batch like a prompt chunk ("jump forward"),
   and count as the answer's. Sampling is engines.batch_sampling's.
   A choice whose answer repeats its own tokens (copying the prompt) also puts an n-gram draft after
   its last token, verified by the same step's logits rows (engines.speculation).

Sequences that finish keep their cells until the space or the sequence id is needed; where prompts
land and where idle conversations' KV state goes (host RAM, disk) is engines.batch_memory's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from services.core.errors import ResourceExhausted, Unavailable
from services.inference.engines.base import EngineError
from services.inference.engines.batch_admission import Admission
from services.inference.engines.batch_memory import SAVE_AFTER_SECONDS, SequenceMemory
from services.inference.engines.batch_sampling import ChoiceSampling, Samplers
from services.inference.engines.decoding import Decoding, KvSequence
from services.inference.engines.fair import Line, Policy
from services.inference.engines.kv_store import DiskKvStore, HostKvStore
from services.inference.engines.sequence import Courier, LineWatch, Request
from services.inference.engines.speculation import Speculation
from services.inference.metrics import draft_counter
from services.inference.models.grammars import CallDictation
from services.inference.models.hardware import EngineSettings

log = logging.getLogger("parley.engine")

SHUTDOWN_SAVE_SECONDS = 10.0  # at most this long writing the warm conversations to disk at shutdown
SWITCH_INTERVAL_SECONDS = 0.0005


def logits_rows(settings: EngineSettings) -> int:
    """Logits rows a step may ask for (the context's n_outputs_max): one per running choice (a request
    with more choices than parallel_slots runs alone, openai_chat.MAX_CHOICES; llama.cpp reserves at
    least one per sequence), and room for a few choices' speculative drafts."""
    return max(settings.parallel_slots, settings.resident_sequences, 16) + 4 * settings.draft_tokens


class BatchScheduler(Admission, SequenceMemory):
    def __init__(self, llama_cpp: Any, ctx: Any, piece: Callable[[int, bool], bytes], *, vocab: Any, n_vocab: int,
                 settings: EngineSettings, host_cache_bytes: int, name: str,
                 tokenize: Callable[[str], list[int]] | None = None, disk: DiskKvStore | None = None) -> None:
        self._l = llama_cpp
        self._ctx = ctx
        self.stats = collections.Counter()  # for tests and logs: parked, saved, restored (from_disk), copied, reused
        self.sampling = ChoiceSampling(llama_cpp, ctx, vocab, n_vocab, piece, tokenize, self.stats)
        self.speculation = Speculation(settings.draft_tokens, logits_rows(settings), self.stats, draft_counter(name))
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._max_running = max(1, settings.parallel_slots)
        self._spare = max(1, self._max_running // 8) if settings.fair_share else 0
        self._queue_depth = settings.queue_depth
        self._budget = settings.batch_tokens
        self._name = name
        self._sequences = [KvSequence(i) for i in range(settings.resident_sequences)]
        self._host = HostKvStore(host_cache_bytes)
        self._disk = disk
        self._batch = llama_cpp.llama_batch_init(self._budget, 0, 1)
        self._courier = Courier()  # every chunk of a step reaches the event loop in one wake-up
        self._policy = Policy(settings.fair_share, self._max_running, settings.queue_depth)
        # Requests waiting, and running choices paused for another user's request; guarded by _cond.
        self._pending: Line[Request | Decoding] = Line(self._policy)
        self._placing: Request | Decoding | None = None
        self._active: list[Decoding] = []  # the decode thread's own
        self._cond = threading.Condition()
        self._line_watch = LineWatch()  # told after each step: queue places are pushed (line_moved)
        self._closing = False
        self._thread: threading.Thread | None = None
        # How long a choice runs from admission to its end (moving average): what queue positions'
        # waits are estimated from; before the first answer ends, its token budget at the step rate.
        self._answer_seconds: float | None = None
        self._step_seconds = 0.01

    # --- the event loop's side -------------------------------------------------------------
    @property
    def running(self) -> int:
        return len({d.request for d in self._active})

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def host_bytes(self) -> int:
        return self._host.bytes

    def line_moved(self) -> asyncio.Event:
        """An event set once the line of waiting requests next moves (engines.sequence.LineWatch)."""
        return self._line_watch.listen()

    def _tell_listeners(self) -> None:
        with self._cond:
            line = (len(self._pending), self._choices())
        self._line_watch.tell(line)

    def start(self) -> None:
        # Each native call (decode, sampling) releases the GIL and takes it back afterwards; while the
        # event loop thread runs Python (gRPC, JSON), taking it back waits for the interpreter's switch
        # interval, 5 ms by default, several times a step. A shorter interval keeps steps short.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_SECONDS))
        self._thread = threading.Thread(target=self._loop, name=f"decode-{self._name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if self._disk is not None:  # the conversations still warm: their next turn may come after a restart
            deadline = time.monotonic() + SHUTDOWN_SAVE_SECONDS
            for seq in sorted(self._sequences, key=lambda s: -s.last_used):  # the most recent first
                self._save(seq, wait=max(0.0, deadline - time.monotonic()))
            self._disk.close(max(0.0, deadline - time.monotonic()))
        self._l.llama_batch_free(self._batch)

    # --- the decode thread ------------------------------------------------------------------
    def _choices(self) -> int:
        """Running choices. One whose last chunk is out no longer counts: its caller may already be
        sending the next turn while this thread tidies up."""
        return sum((d.request.choices[d.index].finish_reason is None) + len(d.followers) for d in self._active)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._pending and not self._active:
                        if not self._cond.wait(SAVE_AFTER_SECONDS if self._disk is not None else None):
                            break  # quiet for a while: a conversation not yet on disk goes there
                    if self._closing:
                        break
                    quiet = not self._pending and not self._active
                if quiet:
                    self._save_idle()
                    continue
                self._step()
        finally:
            gone = Unavailable(f"model {self._name!r} was unloaded while the request ran; retry")
            with self._cond:
                waiting = self._pending.drop(lambda _: True)
            for request in {d.request for d in self._active} | {self._request_of(e) for e in waiting}:
                request.fail(gone)
            for paused in waiting:
                if isinstance(paused, Decoding):
                    paused.samplers.free(self._l)
            for d in list(self._active):
                self._end(d)
            self._courier.deliver()
            self._tell_listeners()

    def _step(self) -> None:
        try:
            self._drop_cancelled()
            self._admit()
            if not self._active:
                return
            self._park_idle()
            began = time.monotonic()
            try:
                self._decode_once()
                self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.monotonic() - began)
            except Exception as exc:  # noqa: BLE001 - a broken step fails its requests, not the loop
                log.exception("decode step failed", extra={"fields": {"model": self._name}})
                for request in {d.request for d in self._active}:
                    request.fail(EngineError(f"generation failed: {exc}"))
                for d in list(self._active):
                    self._end(d, forget=True)
        finally:
            self._courier.deliver()
            self._tell_listeners()

    # --- placing a request -----------------------------------------------------------------
    def _place(self, request: Request) -> None:
        prompt = request.prompt
        if sum(not s.busy for s in self._sequences) < len(request.choices):
            raise ResourceExhausted(f"n={len(request.choices)} needs more free sequences than the model has now; "
                                    "retry shortly or ask for fewer choices", retry_after=1)
        # A seed promises repeatable output; logits computed over a cached prefix differ in the last
        # bits from a fresh prefill, so seeded requests evaluate their whole prompt.
        samplers: list[Samplers] = []
        try:  # before any sequence is taken: a grammar that does not parse fails the request here
            for index in range(len(request.choices)):
                samplers.append(self.sampling.samplers(request, index))
        except Exception:
            for made in samplers:
                made.free(self._l)
            raise
        seq, reused = self._sequence_for(prompt if request.sampling.seed is None else None)
        request.usage.cached_prompt_tokens = reused
        lead = Decoding(request, 0, seq, samplers[0], todo=prompt[reused:])
        grammar = request.sampling.grammar
        if len(request.choices) == 1 and request.top_logprobs is None and grammar is not None and grammar.call_head:
            lead.dictation = CallDictation(grammar)
            if grammar.starts_with_call:
                lead.forced = self.sampling.dictated(samplers[0], lead.dictation.start())
                lead.todo += lead.forced
                if not lead.forced:
                    lead.dictation.refused()
        seq.prompt_len = len(prompt)
        for index in range(1, len(request.choices)):
            follower_seq, _ = self._sequence_for(None)
            follower_seq.prompt_len = len(prompt)
            lead.followers.append(Decoding(request, index, follower_seq, samplers[index]))
        lead.draft = self.speculation.drafter(request)
        request.admitted = True
        self._started(lead)

    # --- one step ----------------------------------------------------------------------------
    def _decode_once(self) -> None:
        batch, l = self._batch, self._l
        n = 0
        outputs: list[tuple[Decoding, int, list[int]]] = []  # a choice, its (first) logits row, its draft
        undo: list[tuple[Decoding, int, int | None, list[int]]] = []

        def add(d: Decoding, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(d.seq.tokens)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = d.seq.id
            batch.logits[n] = logits
            d.seq.tokens.append(token)
            n += 1

        decoding = [d for d in self._active if d.next_token is not None]
        for d, draft in zip(decoding, self._drafts(decoding)):
            undo.append((d, len(d.seq.tokens), d.next_token, d.todo))
            add(d, d.next_token, True)
            outputs.append((d, n - 1, draft))
            for token in draft:
                add(d, token, True)
            d.next_token = None
        decoded = n  # tokens of decoding choices (a step without prompt chunks is timed for speculation)
        prefilling = [d for d in self._active if d.todo]
        shares = self._policy.prefill([(d.owner, len(d.todo)) for d in prefilling], self._budget - n)
        for d, share in zip(prefilling, shares):
            if not share:
                continue
            undo.append((d, len(d.seq.tokens), None, d.todo))
            take, d.todo = d.todo[:share], d.todo[share:]
            for i, token in enumerate(take):
                add(d, token, not d.todo and i == len(take) - 1)
            if not d.todo:
                outputs.append((d, n - 1, []))
        if n == 0:
            return
        batch.n_tokens = n
        rc = l.llama_decode(self._ctx, batch)
        if rc != 0:
            for d, length, token, todo in undo:
                l.llama_memory_seq_rm(self._memory, d.seq.id, length, -1)
                del d.seq.tokens[length:]
                d.next_token, d.todo = token, todo
            if rc == 1 and self._make_room():
                return  # the next step tries again
            raise RuntimeError(f"llama_decode returned {rc}" + (" (the KV cache is full)" if rc == 1 else ""))
        for d, i, draft in outputs:
            if draft:
                self._verify(d, i, draft)
            else:
                self._sample(d, i)
        self.speculation.stepped(n, decoded == n)

    def _drafts(self, decoding: list[Decoding]) -> list[list[int]]:
        """The decoding choices' speculative drafts, in the room the step's prompt chunks leave."""
        offered = [(d.draft, [*d.seq.tokens, d.next_token],
                    d.request.budget - d.request.choices[d.index].completion_tokens)  # tokens it may still emit
                   for d in decoding if d.draft is not None]
        if not offered:
            return [[] for _ in decoding]
        prefill = min(sum(len(d.todo) for d in self._active), self._budget - len(decoding))
        outputs = len(decoding) + sum(bool(d.todo) for d in self._active)
        room = self._budget - len(decoding) - prefill
        drafts = iter(self.speculation.plan(offered, len(decoding) + prefill, outputs, room))
        return [next(drafts) if d.draft is not None else [] for d in decoding]

    def _verify(self, d: Decoding, i: int, draft: list[int]) -> None:
        """Emits what a verified draft yields, one token at a time (each may end the choice), and
        removes the cells of the draft tokens that were not accepted."""
        tokens = self.speculation.verify(
            d.draft, draft, d.request.sampling.temperature <= 0,  # type: ignore[arg-type]
            lambda j: self.sampling.pick(d.request, d.samplers, i + j),
            lambda j: self.sampling.distribution(d.samplers, i + j))
        cells = len(d.seq.tokens) - len(draft)  # the last sampled token's cell and those before it
        for m, token in enumerate(tokens):
            if d.request.token(d.index, token):
                self._truncate(d.seq, cells + m)
                self._end(d)
                return
        self._truncate(d.seq, cells + len(tokens) - 1)
        d.next_token = tokens[-1]

    def _make_room(self) -> bool:
        """Frees the least recently used idle sequence's cells (parking them). False if none."""
        idle = [s for s in self._sequences if not s.busy and s.tokens]
        if idle:
            self._clear(min(idle, key=lambda s: s.last_used))
            return True
        # Every cell belongs to a running choice: end the one that holds the most.
        biggest = max(self._active, key=lambda d: len(d.seq.tokens))
        if len(self._active) == 1:
            return False
        biggest.request.finish(biggest.index, "length")
        self._end(biggest)
        return True

    def _sample(self, d: Decoding, i: int) -> None:
        l = self._l
        if d.forced:  # evaluated now: the dictated text goes out as the answer's, then sampling resumes
            forced, d.forced = d.forced, []
            for token in forced:
                if d.request.token(d.index, token):
                    self._end(d)
                    return
        if d.followers:  # n > 1: the prompt is in d's cells; fork them and sample the same row
            for f in d.followers:
                l.llama_memory_seq_cp(self._memory, d.seq.id, f.seq.id, -1, -1)
                f.seq.tokens = list(d.seq.tokens)
                self._active.append(f)
                self._accept(f, self.sampling.pick(f.request, f.samplers, i), i)
            d.followers = []
        self._accept(d, self.sampling.pick(d.request, d.samplers, i), i)

    def _accept(self, d: Decoding, token: int, i: int) -> None:
        logprob = self.sampling.logprob(i, token, d.request.top_logprobs) if d.request.top_logprobs is not None else None
        if d.request.token(d.index, token, logprob):
            self._end(d)
            return
        dictated = d.dictation.feed(self.sampling.text(token)) if d.dictation else ""
        forced = self.sampling.dictated(d.samplers, dictated) if dictated else []
        if dictated and not forced:
            d.dictation.refused()  # type: ignore[union-attr]
        if forced:
            d.todo, d.forced = [token, *forced], forced
        else:
            d.next_token = token

    def _end(self, d: Decoding, forget: bool = False) -> None:
        """Takes a choice out of the loop and frees its sampler; its sequence keeps its cells."""
        if d in self._active:
            self._active.remove(d)
            ran = time.monotonic() - d.admitted_at
            self._answer_seconds = ran if self._answer_seconds is None else 0.8 * self._answer_seconds + 0.2 * ran
        for f in d.followers:  # ended before its prompt finished: the forks never started
            f.request.finish(f.index, d.request.choices[d.index].finish_reason or "cancelled")
            self._release(f, forget)
        d.followers = []
        self._release(d, forget)

    def _release(self, d: Decoding, forget: bool = False) -> None:
        d.samplers.free(self._l)
        if forget:  # after a failed step the cells may not match the tokens any more
            self._l.llama_memory_seq_rm(self._memory, d.seq.id, -1, -1)
            d.seq.tokens = []
        d.seq.busy = False
        d.seq.last_used = time.monotonic()
