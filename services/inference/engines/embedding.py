"""Embedding engines: a model that turns token sequences into vectors, and the batching they share.

The engine owns admission and batching, as the generation engines do. A request is a list of token
sequences; it waits in a bounded queue (full -> RESOURCE_EXHAUSTED, HTTP 429; with fair share, only
for a caller that holds its share of the queue: engines.fair). One worker thread per model takes
what is queued — from one request or several, callers in turn (engines.fair: a batch is not paused
once it runs, but the next one takes one sequence of each caller's in turn rather than a whole
request first) — and runs it through the model in batches: sequences of similar length together
(each request's are sorted by length), at most
MAX_BATCH_INPUTS of them and about `batch_tokens` padded tokens a batch. A request whose caller
left or whose deadline passed is dropped at the next batch.

EmbeddingEngine is the interface every embedding engine implements (`embed_inputs`); local engines
derive from LocalEmbeddingEngine and fill in `_load`, `_close`, `estimate_mib`, `_tokenize`,
`_with_special_tokens` and `_forward` (blocking; the worker thread calls `_forward`). A remote one
(engines.remote_embedding) passes the inputs to its upstream instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.core.errors import DeadlineExceeded, InvalidArgument
from services.inference.engines.base import EngineError, LoadedModel, LocalModel, queue_full
from services.inference.engines.fair import ANONYMOUS, Line, Owner, Policy, Shares, current_owner
from services.inference.models.hardware import EngineSettings

MAX_BATCH_INPUTS = 128
# Padded tokens per forward pass. On 2 CPU cores 32 short sentences a batch ran at ~380 inputs/s and
# 256 at ~450/s; past a few thousand tokens a batch only adds latency for whoever waits behind it.
BATCH_TOKENS = 8192


@dataclass(eq=False)
class _Job:
    """One request: its sequences (longest last) and where their vectors go."""

    sequences: list[list[int]]
    order: list[int]  # order[k]: the index in the request of the k-th sequence in length order
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    vectors: list[np.ndarray | None] = field(default_factory=list)
    taken: int = 0  # sequences handed to a batch so far (in length order)
    left: int = 0  # sequences whose vector has not come back
    gone: bool = False  # the caller left: drop what is not computed
    owner: Owner = ANONYMOUS  # whom it is computed for (engines.fair)
    cost = 1

    def finish(self, result: np.ndarray | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.gone = True
        self.loop.call_soon_threadsafe(settle)


class EmbeddingEngine(LoadedModel):
    """One loaded embedding model: `embed_inputs` answers a request."""

    task = "embedding"

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict[str, Any]) -> None:
        super().__init__(model_id, path, settings, params)
        self.context_length = 0  # the longest input in tokens, special tokens included; set by load
        self.dimensions = 0  # set by load
        self.normalized = True  # whether vectors come out with unit length; set by load

    @abstractmethod
    async def embed_inputs(self, inputs: Sequence[str | list[int]], deadline: float, truncate: bool = False,
                           owner: Owner | None = None) -> tuple[np.ndarray, list[int], int]:
        """One vector per input (float32 rows, in order), each input's tokens (0s where an upstream
        counts only the total) and the prompt tokens in all. Inputs are texts or token ids in the
        model's vocabulary; one longer than `context_length` is refused, or cut with `truncate`.
        `owner`: whom for, in a local engine's fair share (engines.fair; default: the RPC's caller)."""

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine_name, "device": self.settings.device, "context_length": self.context_length,
                "dimensions": self.dimensions}


class LocalEmbeddingEngine(LocalModel, EmbeddingEngine):
    """An embedding model computed here, behind a batching worker thread."""

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict[str, Any]) -> None:
        super().__init__(model_id, path, settings, params)
        self._queue: Line[_Job] = Line(Policy(settings.fair_share, 0, settings.queue_depth))
        self._wake = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None
        self._running = 0

    # --- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        await super().load()
        self._worker = threading.Thread(target=self._work, name=f"embed-{self.model_id}", daemon=True)
        self._worker.start()

    async def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
        await super().close()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return sum(1 for job in list(self._queue) if job.taken == 0)

    # --- text -> tokens ----------------------------------------------------------------------
    @abstractmethod
    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's tokens with the model's special tokens, untruncated."""

    @abstractmethod
    def _with_special_tokens(self, tokens: list[int]) -> list[int]:
        """Given token ids wrapped in the model's special tokens, as `_tokenize` would."""

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self._tokenize(texts) if texts else []

    def with_special_tokens(self, tokens: list[int]) -> list[int]:
        return self._with_special_tokens(tokens)

    def truncate(self, tokens: list[int]) -> list[int]:
        """The sequence cut to `context_length`, its closing special token(s) kept."""
        if len(tokens) <= self.context_length:
            return tokens
        marked = self._with_special_tokens([-1])
        tail = len(marked) - marked.index(-1) - 1  # special tokens after the text, e.g. [SEP]
        return tokens[: self.context_length - tail] + tokens[len(tokens) - tail:]

    # --- embedding ---------------------------------------------------------------------------
    async def embed(self, sequences: Sequence[list[int]], deadline: float, owner: Owner | None = None) -> np.ndarray:
        """One vector per sequence (float32 rows, in order). Each sequence must fit context_length.
        `owner`: whom for (engines.fair); the caller of the RPC unless given."""
        if self._worker is None or self._closing:
            raise EngineError(f"model {self.model_id!r} is not loaded")
        loop = asyncio.get_running_loop()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        job = _Job([sequences[i] for i in order], order, deadline, loop, loop.create_future(),
                   vectors=[None] * len(sequences), left=len(sequences), owner=owner or current_owner())
        with self._wake:
            waiting = Shares((waiter.owner, 1) for waiter in self._queue if waiter.taken == 0)
            if not self._queue.policy.fits(job.owner, 1, waiting):
                raise queue_full(f"embedding requests for {self.model_id!r}", self.running, self.waiting,
                                 self.settings.queue_depth)
            self._queue.add(job)
            self._wake.notify()
        try:
            return await job.future
        finally:
            job.gone = True  # cancelled or finished: the worker skips what is left

    async def embed_inputs(self, inputs: Sequence[str | list[int]], deadline: float, truncate: bool = False,
                           owner: Owner | None = None) -> tuple[np.ndarray, list[int], int]:
        # Tokenizing thousands of texts blocks; keep it off the loop that serves other requests.
        sequences = await asyncio.to_thread(self._sequences, inputs, truncate)
        tokens = [len(s) for s in sequences]
        return await self.embed(sequences, deadline, owner), tokens, sum(tokens)

    def _sequences(self, inputs: Sequence[str | list[int]], truncate: bool) -> list[list[int]]:
        """Each input's tokens with the model's special tokens, checked against its vocabulary and limit."""
        texts = [(i, text) for i, text in enumerate(inputs) if isinstance(text, str)]
        sequences: list[list[int]] = [[] for _ in inputs]
        for (i, _), tokens in zip(texts, self.tokenize([text for _, text in texts])):
            sequences[i] = tokens
        for i, given in enumerate(inputs):
            if isinstance(given, str):
                continue
            for token in given:
                if not 0 <= token < self.vocab_size:
                    raise InvalidArgument(f"input[{i}]: token {token} is not in the vocabulary of model "
                                          f"{self.model_id!r} ({self.vocab_size} tokens)")
            sequences[i] = self.with_special_tokens(list(given))
        for i, tokens in enumerate(sequences):
            if len(tokens) > self.context_length:
                if not truncate:
                    raise InvalidArgument(
                        f"input[{i}] is {len(tokens)} tokens but model {self.model_id!r} takes at most "
                        f"{self.context_length} tokens an input; shorten it, or send \"truncate\": true to cut it")
                sequences[i] = self.truncate(tokens)
        return sequences

    def _next_batch(self) -> list[tuple[_Job, int]]:
        """(job, position) pairs for one forward pass, callers' sequences in the policy's turn (first
        come, first served: the oldest request's first); called with the lock held."""
        now = time.monotonic()
        for job in self._queue.drop(lambda job: job.gone or now > job.deadline):
            if not job.gone:
                job.finish(DeadlineExceeded("the request's deadline passed before its embeddings were computed"))
        batch: list[tuple[_Job, int]] = []
        longest = 0
        taken = Shares()
        while len(batch) < MAX_BATCH_INPUTS and (job := self._queue.next(taken)) is not None:
            length = len(job.sequences[job.taken])
            if batch and (len(batch) + 1) * max(longest, length) > BATCH_TOKENS:
                break
            batch.append((job, job.taken))
            taken.add(job.owner)
            longest = max(longest, length)
            job.taken += 1
            if job.taken == len(job.sequences):
                self._queue.remove(job)
        return batch

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    for job in self._queue.drop(lambda _: True):
                        job.finish(EngineError(f"model {self.model_id!r} was unloaded"))
                    return
                batch = self._next_batch()
                jobs = {id(job): job for job, _ in batch}
                self._running = len(jobs) + sum(1 for job in self._queue if job.taken)
            if not batch:
                continue
            try:
                vectors = self._forward([job.sequences[k] for job, k in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting caller hears of it
                for job in jobs.values():
                    job.finish(EngineError(f"embedding failed: {exc}"))
                continue
            with self._wake:
                # Counted before any caller hears back, so one that sees its answer sees the engine idle.
                self._running = sum(1 for job in self._queue if job.taken)
            for (job, k), vector in zip(batch, vectors):
                if job.gone:
                    continue
                job.vectors[job.order[k]] = vector
                job.left -= 1
                if job.left == 0:
                    job.finish(np.stack(job.vectors))  # type: ignore[arg-type]

    @abstractmethod
    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        """Vectors (float32, one row per sequence) of a batch; runs on the worker thread."""
