"""What the batch scheduler's (engines.batch) decode thread works on: the context's sequences (KvSequence,
the tokens a sequence id's KV cells hold) and the running choices (Decoding)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.inference.engines.batch_sampling import Samplers
from services.inference.engines.fair import Owner
from services.inference.engines.sequence import Request
from services.inference.engines.speculation import Drafter
from services.inference.models.grammars import CallDictation


@dataclass
class KvSequence:
    """A sequence id of the context and the tokens its KV cells hold (positions 0..len-1)."""

    id: int
    tokens: list[int] = field(default_factory=list)
    prompt_len: int = 0  # how much of `tokens` was the last request's prompt (the rest is its answer)
    last_used: float = 0.0
    busy: bool = False
    saved: int = 0  # len(tokens) when its state last went to disk (0: never, or changed since)


@dataclass
class Decoding:
    """One running choice: its request, its sequence, what it still has to evaluate, its sampler."""

    request: Request
    index: int
    seq: KvSequence
    samplers: Samplers
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    admitted_at: float = field(default_factory=time.monotonic)
    next_token: int | None = None  # sampled, to be evaluated in the next step
    forced: list[int] = field(default_factory=list)  # the end of todo: answer tokens a grammar dictated
    dictation: CallDictation | None = None  # where the grammar dictates the text of a call
    followers: list["Decoding"] = field(default_factory=list)  # n > 1: choices forked after the prompt
    draft: Drafter | None = None  # None: this choice does not speculate
    parked: tuple[list[int], Any] | None = None  # paused for another user: its tokens and KV state

    @property
    def owner(self) -> Owner:
        return self.request.owner

    cost = 1  # a paused choice waits for one running slot (engines.fair.Entry)
