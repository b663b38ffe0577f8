"""Speculative decoding's parts without a model (engines.speculation): the n-gram drafter, the step
cost fit and the drafting policy, greedy verification, and the rejection step's distribution
(chi-square checks with fixed seeds, which a wrong scheme fails)."""

from __future__ import annotations

import collections
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from services.inference.engines.sequence import Sampling
from services.inference.engines.speculation import Drafter, Speculation, StepCost, reject_or_accept
from services.inference.models.grammars import Grammar

# Critical values of the chi-square distribution at p = 0.001 (a correct scheme fails 1 run in 1000;
# the seeds are fixed, so the tests are deterministic).
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52}


def chi_square(counts: collections.Counter, probs: dict[int, float]) -> float:
    total = sum(counts.values())
    assert set(counts) <= set(probs), f"drew tokens outside the support: {set(counts) - set(probs)}"
    return sum((counts[t] - total * p) ** 2 / (total * p) for t, p in probs.items())


def drafter(seed: int = 0) -> Drafter:
    return Drafter(random.Random(seed))


# --- the drafter -------------------------------------------------------------------------------
def test_the_draft_is_what_followed_the_latest_earlier_occurrence_of_the_last_tokens() -> None:
    history = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 0, 2, 3, 4]
    assert drafter().propose(history, 3) == [6, 7, 0]  # the later 2 3 4, not the first
    assert drafter().propose(history, 1) == [6]


def test_a_longer_match_wins_over_a_later_shorter_one() -> None:
    # "3 4" last occurred before 8, but "2 3 4" only before 5: the trigram decides.
    history = [2, 3, 4, 5, 6, 9, 3, 4, 8, 1, 2, 3, 4]
    assert drafter().propose(history, 2) == [5, 6]


def test_no_draft_without_an_earlier_occurrence_or_room() -> None:
    assert drafter().propose([1, 2, 3, 4, 5], 4) == []
    assert drafter().propose([7, 7, 7], 4) == [7]  # n-grams of 2 and 3 tokens only: "7 7" came before "7"
    assert drafter().propose([1, 7, 2, 7], 4) == []  # a single token is too weak a match to draft from
    assert drafter().propose([1, 2, 1, 2], 0) == []
    assert drafter().propose([], 4) == []


def test_the_index_follows_a_growing_history() -> None:
    d = drafter()
    history = [10, 11, 12, 13, 14]
    assert d.propose(history, 2) == []
    history += [10, 11, 12]  # the answer starts to repeat the prompt
    assert d.propose(history, 2) == [13, 14]
    history += [13, 14, 99]  # and departs from it
    assert d.propose(history, 2) == []
    history += [11, 12]
    assert d.propose(history, 5) == [13, 14, 99, 11, 12]  # the latest "11 12" is the second one


def test_a_match_that_goes_further_back_promises_more() -> None:
    text = list(range(100, 140))
    short, long = drafter(), drafter()
    assert short.propose([1, 2, 3, 50, 60, 9, 1, 2, 3], 2) == [50, 60]
    assert long.propose([*text, 7, *text[:30]], 2) == text[30:32]  # 30 tokens copied so far
    assert 0.55 < short.alpha < 0.65 < 0.9 < long.alpha


def test_acceptance_falls_with_rejections_and_recovers_while_idle() -> None:
    d = drafter()
    assert d.propose([1, 2, 3, 50, 60, 9, 1, 2, 3], 2) == [50, 60]
    start = d.alpha
    for _ in range(6):
        d.learn(4, 0)
    low = d.alpha
    assert low < 0.3 < start
    for _ in range(200):
        d.idle()
    assert low < d.alpha <= start + 1e-9
    for _ in range(10):
        d.learn(8, 8)
    assert d.alpha > 0.9


# --- the policy ------------------------------------------------------------------------------
def test_the_step_cost_fit_recovers_the_fixed_share() -> None:
    cost = StepCost()
    assert cost.threshold(1) == pytest.approx(0.5)  # the prior before any step: a = b
    for n in [1, 2, 5, 3, 1, 8, 4, 1, 6, 2] * 3:
        cost.observe(n, 0.010 + 0.002 * n)  # a = 10 ms, b = 2 ms: a / b = 5
    assert cost.fixed_share() == pytest.approx(5.0, rel=1e-6)
    assert cost.threshold(1) == pytest.approx(1 / 6)
    assert cost.threshold(1) < cost.threshold(8) < cost.threshold(64) < 1


def choices(count: int, hits: int) -> list[tuple[Drafter, list[int], int]]:
    made = []
    for c in range(count):
        d = drafter(c)
        for _ in range(hits):
            d.learn(8, 8)
        made.append((d, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3], 100))
    return made


def test_drafts_shrink_as_more_sequences_share_the_step() -> None:
    spec = Speculation(8, 64, collections.Counter())
    for n in range(1, 10):
        spec.cost.observe(n, 0.010 + 0.002 * n)  # a / b = 5, like a small model on a CPU
    alone = spec.plan(choices(1, 10), tokens=1, outputs=1, room=500)
    assert alone == [[4, 5, 6, 7, 8, 9, 10, 1]]
    eight = spec.plan(choices(8, 10), tokens=8, outputs=8, room=500)
    assert 0 < sum(map(len, eight)) < 8 * len(alone[0])
    busy = spec.plan(choices(8, 10), tokens=200, outputs=8, room=300)  # a long prompt chunk fills the step
    assert busy == [[]] * 8


def test_drafts_respect_the_room_the_rows_and_what_a_choice_may_still_emit() -> None:
    spec = Speculation(8, 20, collections.Counter())
    for n in range(1, 10):
        spec.cost.observe(n, 0.010 + 0.0001 * n)  # tokens nearly free: only the limits stop drafts
    assert sum(map(len, spec.plan(choices(4, 10), tokens=4, outputs=4, room=5))) == 5
    assert sum(map(len, spec.plan(choices(4, 10), tokens=4, outputs=17, room=500))) == 3
    (d, history, _), = choices(1, 10)
    assert spec.plan([(d, history, 3)], tokens=1, outputs=1, room=500) == [[4, 5]]  # 2 drafts + 1 token


def test_a_choice_whose_drafts_fail_stops_drafting() -> None:
    spec = Speculation(8, 64, collections.Counter())
    (d, history, left), = choices(1, 0)
    for _ in range(8):
        d.learn(4, 0)
    assert spec.plan([(d, history, left)], tokens=1, outputs=1, room=500) == [[]]


def test_only_plain_single_choices_speculate() -> None:
    spec = Speculation(8, 64, collections.Counter())

    def request(n: int = 1, logprobs: int | None = None, **sampling: object) -> SimpleNamespace:
        return SimpleNamespace(sampling=replace(Sampling(), **sampling), choices=[None] * n, top_logprobs=logprobs)

    assert spec.drafter(request(temperature=0.0, seed=3)) is not None
    assert spec.drafter(request(temperature=0.8, top_k=0, logit_bias=((5, 2.0),), stop=("x",))) is not None
    for refused in (request(n=2), request(logprobs=0), request(repetition_penalty=1.1), request(presence_penalty=0.5),
                    request(frequency_penalty=0.5), request(grammar=Grammar(gbnf='root ::= "a"')),
                    request(temperature=0.5, seed=3)):
        assert spec.drafter(refused) is None
    assert Speculation(0, 64, collections.Counter()).drafter(request()) is None


# --- verification ------------------------------------------------------------------------------
def test_greedy_verification_keeps_the_agreeing_head_and_the_first_disagreement() -> None:
    stats: collections.Counter = collections.Counter()
    spec = Speculation(8, 64, stats)
    picks = [5, 6, 9, 4]  # the chain's own choice on each row

    def never(j: int) -> tuple:
        raise AssertionError("greedy verification needs no distribution")

    assert spec.verify(drafter(), [5, 6, 7], True, picks.__getitem__, never) == [5, 6, 9]
    assert spec.verify(drafter(), [5, 6, 9], True, picks.__getitem__, never) == [5, 6, 9, 4]  # all taken, + 1
    assert spec.verify(drafter(), [1], True, picks.__getitem__, never) == [5]
    assert (stats["drafted"], stats["accepted"]) == (7, 5)


P = {0: 0.05, 1: 0.30, 2: 0.25, 3: 0.15, 4: 0.25}
IDS, PROBS = list(P), list(P.values())


def test_the_rejection_step_draws_from_the_target_distribution() -> None:
    for drafted, seed in ((1, 1), (0, 2), (4, 3)):
        rng = random.Random(seed)
        counts = collections.Counter(reject_or_accept(drafted, IDS, PROBS, rng)[1] for _ in range(20000))
        assert chi_square(counts, P) < CHI2_999[len(P) - 1], (drafted, counts)


def test_the_chi_square_check_catches_a_scheme_that_forgets_to_remove_the_draft() -> None:
    """The check above has the power to fail: resampling from p itself on rejection (a common bug)
    over-weights the drafted token, and the same statistic rejects it."""
    rng = random.Random(1)

    def wrong(drafted: int) -> int:
        if rng.random() < P[drafted]:
            return drafted
        return rng.choices(IDS, PROBS)[0]

    counts = collections.Counter(wrong(1) for _ in range(20000))
    assert chi_square(counts, P) > CHI2_999[len(P) - 1]


def test_a_certain_or_impossible_draft() -> None:
    rng = random.Random(0)
    assert reject_or_accept(7, [7], [1.0], rng) == (True, 7)
    assert all(reject_or_accept(9, IDS, PROBS, rng)[1] in P for _ in range(200))  # outside the support
    assert all(not reject_or_accept(0, [0, 1], [0.0, 1.0], rng)[0] for _ in range(200))


def test_sampled_verification_of_a_two_token_draft_keeps_each_position_distributed() -> None:
    """With a draft [1, 2] the first emitted token follows row 0's distribution; after 1 was accepted
    the second follows row 1's; a fully accepted draft's extra token comes from pick(2)."""
    q = {0: 0.1, 1: 0.2, 2: 0.6, 3: 0.1}
    rows = [(IDS, PROBS), (list(q), list(q.values()))]
    spec = Speculation(8, 64, collections.Counter())
    d = drafter(5)
    firsts, seconds, extras = collections.Counter(), collections.Counter(), 0
    for _ in range(30000):
        out = spec.verify(d, [1, 2], False, lambda j: 42, rows.__getitem__)
        firsts[out[0]] += 1
        if out[0] == 1:
            seconds[out[1]] += 1
            if out[1] == 2:
                assert out[2:] == [42]
                extras += 1
        else:
            assert len(out) == 1
    assert chi_square(firsts, P) < CHI2_999[4]
    assert chi_square(seconds, q) < CHI2_999[3]
    assert extras == seconds[2] > 0
