"""Draft-free speculative decoding for the batch scheduler (engines.batch): n-gram drafts from a
choice's own tokens ("prompt lookup"), verified in the same llama_decode step as every other
sequence's tokens.

Drafting. The last 3 (then 2) tokens of the prompt and answer so far are looked up among the earlier
ones; the tokens that followed their latest earlier occurrence are the draft. An answer that repeats
or edits the prompt (copying a paragraph, rewriting code, quoting) is drafted well; plain chat rarely
finds a match, and then costs nothing.

Verifying. A drafting choice puts its last sampled token and its draft into the step's batch, each
with a logits row. Row j decides the token after draft j-1: greedy (temperature 0) takes the chain's
own pick and accepts the draft while it agrees — the same tokens as without speculation. Sampled
choices keep the exact distribution with the standard rejection scheme for a deterministic draft:
the drafted token x is accepted with probability p(x) under the chain's processed distribution
(bias, top-k, top-p, min-p, temperature); on rejection the token is drawn from p without x,
renormalised. The first disagreement ends the run; after a fully accepted draft the last row gives
one more token, sampled as usual. Rejected drafts' KV cells are removed by the scheduler.

Adaptive. A draft token is worth its place in the batch when it raises the step's yield, tokens
per second: with a step of N tokens costing a + b·N and yielding E tokens (one per decoding choice,
every prompt token, and the drafts' expected accepted tokens), one more token adds b and is worth
it when P(accepted) > b·E / (a + b·N). a and b are fitted from the decode-only steps the scheduler
has timed; a choice's P(accepted) for its j-th draft token is α^j, α its recent
acceptance rate, starting from what the match promises (a match that goes on far back, as in a
text being copied, promises more than a bare trigram). So drafts grow long for one stream on a GPU, shrink as more sequences (or prompt
chunks) fill the batch, and stop for a choice whose drafts keep failing — the busy server pays
nothing for them. A choice that stops drafting drifts back to trying now and then.

Not speculated (their state could not be rolled back, or the output differs): grammar-constrained
choices (json_schema, tools), logprobs, repetition/presence/frequency penalties, n > 1, and seeded
sampled choices (a seed promises repeatable output, and how far each step drafts depends on timings,
which would change which random draws decide). Stop strings,
end tokens and max_tokens still hold: accepted tokens are emitted one by one and the run stops at the
first that ends the choice.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.inference.engines.sequence import Request

NGRAM_SIZES = (3, 2)  # longest first: a longer match drafts better
MATCH_WINDOW = 32  # how far back a match is followed to judge it
PRIOR_FIXED_SHARE = 1.0  # a / b before the step cost is fitted: a token's share of a 1-token step is 1/2
MIN_FIXED_SHARE, MAX_FIXED_SHARE = 0.25, 16.0  # a noisy fit stays within these
MAX_ALPHA = 0.97  # α never reaches 1: every further draft token must be worth a little less


class Drafter:
    """One choice's n-gram index over its tokens and its recent acceptance rate."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng  # the rejection step's draws (sampled choices)
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ends
        self._indexed = 0  # n-grams ending before this position are in the index
        self._hits = 0.0  # decayed counts of accepted and rejected draft tokens
        self._misses = 0.0
        self._prior = 0.5  # what the last match's length promises (propose)

    @property
    def alpha(self) -> float:
        """The expected chance that a draft token is accepted: the last match's promise as a prior of
        weight 2.5, then the choice's recent counts."""
        return min(MAX_ALPHA, (self._hits + 2.5 * self._prior) / (self._hits + self._misses + 2.5))

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of history's last n-gram."""
        if limit <= 0:
            return []
        end = len(history)
        # Index every n-gram that has a token after it, i.e. ending before the last position.
        for stop in range(max(self._indexed, 1), end):
            for n in NGRAM_SIZES:
                if stop >= n:
                    self._index[tuple(history[stop - n:stop])] = stop
        self._indexed = max(self._indexed, end)
        for n in NGRAM_SIZES:
            if end <= n:  # the n-gram is all there is: nothing earlier to find
                continue
            at = self._index.get(tuple(history[end - n:]))
            if at is not None:
                # A text being copied matches far back (m tokens): m / (m + 2) is 0.6 for a bare
                # trigram, 0.8 after 8 tokens, 0.94 after 32.
                m = n
                while m < MATCH_WINDOW and m < at and history[at - 1 - m] == history[end - 1 - m]:
                    m += 1
                self._prior = m / (m + 2)
                return list(history[at:at + limit])
        return []

    def learn(self, drafted: int, accepted: int) -> None:
        self._hits = 0.8 * self._hits + accepted
        self._misses = 0.8 * self._misses + (accepted < drafted)

    def idle(self) -> None:
        """A step without a draft: the evidence fades, so a choice that stopped drafting tries again."""
        self._hits *= 0.97
        self._misses *= 0.97


@dataclass
class StepCost:
    """Decode-only steps' seconds against their tokens, fitted as a + b·tokens (decayed least squares)."""

    decay: float = 0.98
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, Σn, Σt, Σn², Σnt

    def observe(self, tokens: int, seconds: float) -> None:
        w, sn, st, snn, snt = (self.decay * s for s in self._sums)
        self._sums = [w + 1, sn + tokens, st + seconds, snn + tokens * tokens, snt + tokens * seconds]

    def fixed_share(self) -> float:
        """a / b: how many tokens' worth of a step's time does not grow with its tokens."""
        w, sn, st, snn, snt = self._sums
        if w < 8:
            return PRIOR_FIXED_SHARE
        mean_n, mean_t = sn / w, st / w
        var = snn / w - mean_n * mean_n
        if var < 0.25:  # every step had (nearly) the same size: nothing to fit
            return PRIOR_FIXED_SHARE
        b = (snt / w - mean_n * mean_t) / var
        if b <= 0:  # tokens look free: believed once many steps say so, else noise
            return MAX_FIXED_SHARE if w >= 16 else PRIOR_FIXED_SHARE
        return min(MAX_FIXED_SHARE, max(MIN_FIXED_SHARE, (mean_t - b * mean_n) / b))

    def threshold(self, tokens: int, expected: float | None = None) -> float:
        """The acceptance chance one more token needs in a step of `tokens` that yields `expected`
        tokens (default: all of them): b·E / (a + b·N)."""
        return (tokens if expected is None else expected) / (self.fixed_share() + tokens)


class Speculation:
    """The scheduler's drafting policy and verification; used on its decode thread only."""

    def __init__(self, max_draft: int, max_outputs: int, stats: collections.Counter[str],
                 counted: Callable[[int, int], None] | None = None) -> None:
        self.max_draft = max_draft
        self.max_outputs = max_outputs  # logits rows a step may ask for (the context's n_outputs_max)
        self.cost = StepCost()
        self.stats = stats
        self._counted = counted  # (accepted, rejected) -> the Prometheus counter
        self._last_step: float | None = None  # when the last decode-only step ended

    def stepped(self, tokens: int, decode_only: bool) -> None:
        """A step of `tokens` has ended. Back-to-back decode-only steps are timed end to end (the
        scheduler's own work and the wait for the GIL count as much as llama_decode) for the cost fit;
        steps with prompt chunks, whose tokens cost less, are not."""
        now = time.perf_counter()
        if decode_only and self._last_step is not None:
            self.cost.observe(tokens, now - self._last_step)
        self._last_step = now if decode_only else None

    def drafter(self, request: Request) -> Drafter | None:
        """A drafter for a choice that may speculate; None for one that may not (module docstring)."""
        s = request.sampling
        if (self.max_draft <= 0 or len(request.choices) > 1 or request.top_logprobs is not None
                or s.grammar is not None or s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty
                or (s.seed is not None and s.temperature > 0)):
            return None
        return Drafter(random.Random())

    def plan(self, choices: Sequence[tuple[Drafter, Sequence[int], int]], tokens: int, outputs: int,
             room: int) -> list[list[int]]:
        """Drafts for (drafter, history, most tokens it may still emit) of the step's decoding choices,
        given the step's `tokens` and logits rows `outputs` without them and `room` tokens left in
        its batch. Each draft token goes in, most likely first, while it is worth its cost."""
        drafts: list[list[int]] = []
        offers: list[tuple[float, int]] = []  # (P(accepted), choice), each choice's in draft order
        for c, (drafter, history, remaining) in enumerate(choices):
            drafts.append(drafter.propose(history, min(self.max_draft, remaining - 1)))
            alpha = drafter.alpha
            offers += [(alpha ** (j + 1), c) for j in range(len(drafts[c]))]
        taken = [0] * len(choices)
        expected = float(tokens)
        for worth, c in sorted(offers, key=lambda offer: -offer[0]):  # stable: a choice's draft stays in order
            if worth <= self.cost.threshold(tokens, expected) or room <= 0 or outputs >= self.max_outputs:
                break
            taken[c] += 1
            tokens, outputs, room, expected = tokens + 1, outputs + 1, room - 1, expected + worth
        for c, draft in enumerate(drafts):
            del draft[taken[c]:]
            if not draft:
                choices[c][0].idle()
        return drafts

    def verify(self, drafter: Drafter, draft: Sequence[int], greedy: bool, pick: Callable[[int], int],
               distribution: Callable[[int], tuple[Any, Any]]) -> list[int]:
        """The tokens a verified draft yields: its accepted head and one more token. Row j (of the
        choice's rows, in order) holds the logits after draft token j-1; pick(j) samples it with the
        choice's chain, distribution(j) gives (token ids, probabilities) of its processed distribution."""
        out: list[int] = []
        for j, drafted in enumerate(draft):
            if greedy:
                token = pick(j)
                accepted = token == drafted
            else:
                accepted, token = reject_or_accept(drafted, *distribution(j), drafter.rng)
            if not accepted:
                out.append(token)
                break
            out.append(drafted)
        else:
            out.append(pick(len(draft)))
        accepted = len(out) - 1
        drafter.learn(len(draft), accepted)
        self.stats["drafted"] += len(draft)
        self.stats["accepted"] += accepted
        if self._counted is not None:
            self._counted(accepted, len(draft) - accepted)
        return out


def reject_or_accept(drafted: int, ids: Any, probs: Any, rng: random.Random) -> tuple[bool, int]:
    """The rejection step for a deterministic draft: (True, drafted) with probability p(drafted);
    otherwise (False, a token drawn from p without `drafted`, renormalised). ids/probs: the target
    distribution's support and its probabilities."""
    import numpy as np

    ids = np.asarray(ids)
    rest = np.asarray(probs, dtype=np.float64).copy()
    hit = ids == drafted
    if rng.random() < float(rest[hit].sum()):
        return True, drafted
    rest[hit] = 0.0
    cumulative = np.cumsum(rest)
    total = float(cumulative[-1]) if len(cumulative) else 0.0
    if total <= 0:  # p(drafted) was 1 up to rounding: nothing else can be drawn
        return True, drafted
    # side="right" steps over zero-probability entries (the drafted token among them).
    k = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
    if k >= len(ids):  # rounding: the last token with any probability
        k = int(np.flatnonzero(rest)[-1])
    return False, int(ids[k])
