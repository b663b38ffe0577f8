"""Speculative decoding in the batched llama.cpp engine with the real bundled model: greedy answers
are the same with and without drafts (a copy prompt, where drafts are accepted, and a plain one),
max_tokens and stop strings hold when a step accepts several tokens, rejected drafts leave no KV
cells behind, the acceptance shows in the scheduler's stats and the Prometheus counter, and the
distribution sampled drafts are judged by is the one llama.cpp's sampler chain draws from."""

from __future__ import annotations

import collections

import pytest

from services.inference.engines.sequence import Request, Sampling
from services.inference.metrics import DRAFT_TOKENS
from tests.unit.inference.test_batch_engine import MODEL, make, scheduler, turn

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
             "polished the great lens, and lit the lamp that warned ships away from the rocks below. In winter "
             "the storms shook the tower, but the light never failed, and sailors along the coast trusted it "
             "more than any chart.")
COPY = [{"role": "user", "content": "Copy this paragraph exactly, word for word:\n\n" + PARAGRAPH}]
PLAIN = [{"role": "user", "content": "Name three things people do on a rainy afternoon."}]


async def answers(draft_tokens: str, asks: list[tuple[list[dict], dict]]) -> tuple[list[tuple[str, object]], dict]:
    registry, generation = make(PARLEY_DRAFT_TOKENS=draft_tokens)
    try:
        await registry.load(MODEL)
        got = [await turn(generation, chat, **sampling) for chat, sampling in asks]
        sched = scheduler(registry)
        highest = registry.get(MODEL).engine._llama_cpp.llama_memory_seq_pos_max
        cells = {s.id: (len(s.tokens), highest(sched._memory, s.id)) for s in sched._sequences if s.tokens}
        return got, {**sched.stats, "cells": cells}
    finally:
        await registry.close()


def accepted_total() -> float:
    return DRAFT_TOKENS.labels(MODEL, "accepted")._value.get()


ASKS = [
    (COPY, {"max_tokens": 90, "temperature": 0}),
    (PLAIN, {"max_tokens": 40, "temperature": 0}),
    (COPY, {"max_tokens": 23, "temperature": 0}),  # ends mid-draft: exactly max_tokens
    (COPY, {"max_tokens": 90, "temperature": 0, "stop": ["great lens"]}),
]


_RUNS: list[tuple[list, dict, list, dict, float]] = []  # the two engines' answers, made once for the module


@pytest.fixture
async def both() -> tuple[list, dict, list, dict, float]:
    if not _RUNS:
        before = accepted_total()
        on, on_stats = await answers("8", ASKS)
        counted = accepted_total() - before
        off, off_stats = await answers("0", ASKS)
        _RUNS.append((on, on_stats, off, off_stats, counted))
    return _RUNS[0]


async def test_greedy_answers_are_the_same_with_and_without_drafts(both) -> None:
    on, _, off, _, _ = both
    for (text_on, last_on), (text_off, last_off), (chat, _) in zip(on, off, ASKS):
        assert text_on == text_off, chat[0]["content"][:40]
        assert last_on.finish_reason == last_off.finish_reason
        assert last_on.usage.completion_tokens == last_off.usage.completion_tokens
    assert "lighthouse keeper climbed" in on[0][0]  # the model does copy: drafts had something to match


async def test_drafts_are_accepted_on_a_copy_and_counted(both) -> None:
    _, on_stats, _, off_stats, counted = both
    assert on_stats["accepted"] >= 40, on_stats  # most of ~90 copied tokens came from drafts
    assert on_stats["accepted"] <= on_stats["drafted"]
    assert counted == on_stats["accepted"]
    assert off_stats.get("drafted", 0) == 0


async def test_stop_conditions_hold_when_a_step_accepts_several_tokens(both) -> None:
    on, _, _, _, _ = both
    _, capped = on[2]
    assert capped.finish_reason == "length" and capped.usage.completion_tokens == 23
    text, stopped = on[3]
    assert stopped.finish_reason == "stop" and "great lens" not in text and text.endswith("polished the ")


async def test_rejected_drafts_leave_no_cells_behind(both) -> None:
    _, on_stats, _, _, _ = both
    assert on_stats["drafted"] > on_stats["accepted"], "some drafts were rejected: their cells had to go"
    for seq_id, (tokens, highest) in on_stats["cells"].items():
        assert highest == tokens - 1, f"sequence {seq_id}: cells up to {highest} for {tokens} tokens"


async def test_a_sampled_copy_speculates_and_a_seeded_one_does_not() -> None:
    registry, generation = make(PARLEY_DRAFT_TOKENS="8")
    try:
        await registry.load(MODEL)
        _, last = await turn(generation, COPY, max_tokens=60, temperature=0.3)
        assert last.usage.completion_tokens > 20 and scheduler(registry).stats["accepted"] > 10
        drafted = scheduler(registry).stats["drafted"]
        # A seed promises repeatable output, and how far a step drafts depends on timings: no drafts.
        _, seeded = await turn(generation, COPY, max_tokens=40, temperature=0.3, seed=7)
        assert seeded.usage.completion_tokens > 20 and scheduler(registry).stats["drafted"] == drafted
    finally:
        await registry.close()


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (z = 3.09), by Wilson and Hilferty."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


async def test_the_distribution_drafts_are_judged_by_is_the_one_the_chain_draws_from() -> None:
    """The rejection step's p (the chain without its draw: bias, top-k, top-p, min-p, temperature)
    against thousands of draws of the real llama.cpp chain from the same logits row."""
    registry, generation = make(PARLEY_DRAFT_TOKENS="0")
    try:
        await registry.load(MODEL)
        await turn(generation, PLAIN, max_tokens=3, temperature=0)  # leaves a decoding step's row 0
        engine, sampling = registry.get(MODEL).engine, scheduler(registry).sampling
        wanted = Sampling(temperature=1.3, top_k=30, top_p=0.97, min_p=0.01, logit_bias=((13, 1.5),))
        request = Request(MODEL, [1, 2, 3], wanted, started=0.0, deadline=None, budget=8,
                          detokenize=engine._detokenize, is_end=engine._is_end)
        made = sampling.samplers(request, 0)
        try:
            ids, probs = sampling.distribution(made, 0)
            draws = collections.Counter(sampling.pick(request, made, 0) for _ in range(6000))
        finally:
            made.free(engine._llama_cpp)
        expected = dict(zip(ids.tolist(), probs.tolist()))
        assert len(expected) > 5 and set(draws) <= set(expected)
        big = {t: p for t, p in expected.items() if p * 6000 >= 5}  # the rest pooled into one cell
        rest = 1 - sum(big.values())
        statistic = sum((draws[t] - 6000 * p) ** 2 / (6000 * p) for t, p in big.items())
        if rest * 6000 >= 5:
            statistic += (sum(c for t, c in draws.items() if t not in big) - 6000 * rest) ** 2 / (6000 * rest)
        assert statistic < chi_square_critical(len(big) - (rest * 6000 < 5)), (statistic, len(big))
    finally:
        await registry.close()
