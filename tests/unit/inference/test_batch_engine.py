"""The batched llama.cpp engine with the real bundled model: admission, chunked prefill, warm
conversations, eviction to host RAM and to disk and restore (also after a restart), prefix copies,
cancellation mid-prefill, n > 1 forks and logprobs."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.core import config
from services.core.errors import ResourceExhausted
from services.inference.engines import kv_store
from services.inference.engines.fair import Owner
from services.inference.flow.service import GenerationService, SamplingInput
from services.inference.models.hardware import probe
from services.inference.models.registry import BUNDLED, ModelRegistry
from services.inference.settings import InferenceSettings
from tests.unit.inference.test_registry_and_engine import generated

MODEL = BUNDLED["id"]
SYSTEM = ("You are a helpful assistant for a team of engineers. Answer briefly and precisely, use plain "
          "words, and say so when you do not know something. Never invent facts about the team or its code.")


def make(**env: str) -> tuple[ModelRegistry, GenerationService]:
    values = {"PARLEY_CONTEXT_LENGTH": "1024", "PARLEY_QUEUE_DEPTH": "8", "PARLEY_PARALLEL_SLOTS": "4",
              "PARLEY_KV_CACHE_TOKENS": "4096", **env}
    settings = config.load(InferenceSettings, values)
    registry = ModelRegistry(settings, probe())
    return registry, GenerationService(registry, settings)


async def turn(generation: GenerationService, messages: list[dict], **sampling) -> tuple[str, object]:
    parts, last = [], None
    async for chunk in generated(generation, MODEL, messages, "", SamplingInput(**sampling)):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


def scheduler(registry: ModelRegistry):
    return registry.get(MODEL).engine._scheduler


@pytest.fixture
async def engine():
    registry, generation = make()
    await registry.load(MODEL)
    yield registry, generation
    await registry.close()


async def test_concurrent_requests_decode_in_one_batch_and_match_their_solo_answers(engine) -> None:
    registry, generation = engine
    prompts = [[{"role": "user", "content": f"Name a colour and a fruit. ({i})"}] for i in range(4)]
    solo = [(await turn(generation, p, max_tokens=12, temperature=0, seed=1))[0] for p in prompts]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, registry.get(MODEL).engine.running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(*(turn(generation, p, max_tokens=12, temperature=0, seed=1) for p in prompts))
    watcher.cancel()
    assert peak >= 3, "the requests should have run side by side"
    assert all(last.finish_reason in ("stop", "length") and last.usage.completion_tokens > 0 for _, last in together)
    # Greedy answers of the same prompts agree whether decoded alone or in one batch (first words at least).
    for (text, _), alone in zip(together, solo):
        assert text[:8] == alone[:8]


async def test_the_same_seeded_request_repeats_on_an_idle_engine(engine) -> None:
    _, generation = engine
    chat = [{"role": "user", "content": "Invent a name for a ship."}]
    first = await turn(generation, chat, max_tokens=16, temperature=1.0, seed=42)
    second = await turn(generation, chat, max_tokens=16, temperature=1.0, seed=42)
    assert first[0] == second[0]
    assert second[1].usage.cached_prompt_tokens == 0  # seeded: evaluated whole, for repeatable logits


async def test_a_long_prompt_is_prefilled_in_chunks_while_other_streams_decode() -> None:
    registry, generation = make(PARLEY_BATCH_TOKENS="32")
    try:
        await registry.load(MODEL)
        stamps: list[float] = []

        async def stream() -> None:
            async for chunk in generated(generation, MODEL, [{"role": "user", "content": "Count from one to fifty."}],
                                                      "", SamplingInput(max_tokens=60, temperature=0)):
                if chunk.text:
                    stamps.append(time.monotonic())

        running = asyncio.create_task(stream())
        while not stamps:
            await asyncio.sleep(0.005)
        long_prompt = [{"role": "user", "content": "Summarise: " + " ".join(f"item {i} is fine." for i in range(80))}]
        sent = time.monotonic()
        _, last = await turn(generation, long_prompt, max_tokens=1, temperature=0)
        first_token = sent + last.usage.time_to_first_token_ms / 1000
        await running
        assert last.usage.prompt_tokens > 200  # > 6 chunks of 32
        during = [t for t in stamps if sent < t < first_token]
        assert len(during) >= 4, "the running stream kept decoding between the long prompt's chunks"
    finally:
        await registry.close()


async def test_next_turn_reuses_its_sequence_and_a_shared_system_prompt_is_copied(engine) -> None:
    registry, generation = engine
    a = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a compiler?"}]
    text, first = await turn(generation, a, max_tokens=16, temperature=0)
    a += [{"role": "assistant", "content": text}, {"role": "user", "content": "And an interpreter?"}]
    _, second = await turn(generation, a, max_tokens=4, temperature=0)
    assert second.usage.cached_prompt_tokens >= first.usage.prompt_tokens - 1

    copied = scheduler(registry).stats["copied"]
    b = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a sorting algorithm."}]
    _, other = await turn(generation, b, max_tokens=4, temperature=0)
    assert other.usage.cached_prompt_tokens >= 40  # the system prompt came from conversation a's cells
    assert scheduler(registry).stats["copied"] == copied + 1
    # ... and conversation a is still warm.
    _, third = await turn(generation, a, max_tokens=4, temperature=0)
    assert third.usage.cached_prompt_tokens >= second.usage.prompt_tokens - 1


async def test_evicted_conversations_park_in_host_ram_and_restore() -> None:
    registry, generation = make(PARLEY_PARALLEL_SLOTS="1", PARLEY_RESIDENT_SEQUENCES="2")
    try:
        chats = [[{"role": "user", "content": f"Tell me one fact about the number {n}, in a long sentence."}]
                 for n in (7, 12, 31)]
        firsts = []
        for chat in chats:
            text, last = await turn(generation, chat, max_tokens=24, temperature=0)
            chat += [{"role": "assistant", "content": text}, {"role": "user", "content": "Another one."}]
            firsts.append(last)
        stats = scheduler(registry).stats
        assert stats["parked"] >= 1  # two sequences, three conversations
        _, again = await turn(generation, chats[0], max_tokens=4, temperature=0)
        assert stats["restored"] == 1
        assert again.usage.cached_prompt_tokens >= firsts[0].usage.prompt_tokens - 1
    finally:
        await registry.close()


async def test_cancelling_during_prefill_frees_the_engine_within_a_step() -> None:
    registry, generation = make(PARLEY_BATCH_TOKENS="16")
    try:
        await registry.load(MODEL)
        engine = registry.get(MODEL).engine
        long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(150))}]
        task = asyncio.create_task(turn(generation, long_prompt, max_tokens=5))
        for _ in range(5000):
            if engine.running or task.done():
                break
            await asyncio.sleep(0.001)
        assert engine.running == 1
        await asyncio.sleep(0.05)  # a few chunks in, far from done
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while engine.running:
            await asyncio.sleep(0.001)
        assert time.monotonic() - cancelled_at < 0.5
        text, last = await turn(generation, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
        assert last.finish_reason in ("stop", "length")
    finally:
        await registry.close()


async def test_n_choices_fork_after_one_prompt(engine) -> None:
    _, generation = engine
    chat = [{"role": "user", "content": "Write a random word."}]
    texts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finished: dict[int, str] = {}
    last = None
    async for chunk in generated(generation, MODEL, chat, "", SamplingInput(max_tokens=8, temperature=1.5, seed=3), n=3):
        texts[chunk.index].append(chunk.text)
        if chunk.finish_reason:
            finished[chunk.index] = chunk.finish_reason
        last = chunk
    assert set(finished) == {0, 1, 2}
    assert last.usage is not None and last.usage.prompt_tokens < 40  # the prompt is counted once
    assert last.usage.completion_tokens >= 3
    assert len({"".join(t) for t in texts.values()}) >= 2  # differently seeded choices differ


async def test_logprobs_come_from_the_logits_row(engine) -> None:
    _, generation = engine
    seen = []
    async for chunk in generated(generation, MODEL, [{"role": "user", "content": "Say hello."}], "",
                                              SamplingInput(max_tokens=6, temperature=0), top_logprobs=3):
        seen += chunk.logprobs
    assert seen
    for lp in seen:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert [p for _, _, p in lp.top] == sorted((p for _, _, p in lp.top), reverse=True)
        assert lp.top[0][0] == lp.token and abs(lp.top[0][2] - lp.logprob) < 1e-4  # greedy takes the best


async def test_a_full_queue_is_refused() -> None:
    registry, generation = make(PARLEY_PARALLEL_SLOTS="1", PARLEY_QUEUE_DEPTH="1")
    try:
        await registry.load(MODEL)
        chat = [{"role": "user", "content": "Tell a long story."}]
        first = asyncio.create_task(turn(generation, chat, max_tokens=200))
        while registry.get(MODEL).engine.running == 0:
            await asyncio.sleep(0.001)
        second = asyncio.create_task(turn(generation, chat, max_tokens=2))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="queue depth 1"):
            await turn(generation, chat, max_tokens=2)
        first.cancel()
        _, last = await second
        assert last.finish_reason in ("stop", "length")
    finally:
        await registry.close()


async def test_waiting_requests_are_told_their_place_in_line() -> None:
    """The engine owns admission, so it says where a waiting request stands (report_queue): each
    place once, counting down, all before Admitted; a request that runs at once hears nothing."""
    from services.inference.flow.service import Admitted, Queued

    registry, generation = make(PARLEY_PARALLEL_SLOTS="1", PARLEY_QUEUE_DEPTH="4")
    chat = [{"role": "user", "content": "Tell a long story."}]

    async def items(max_tokens: int) -> list:
        out = []
        async for item in generation.generate(MODEL, chat, "", SamplingInput(max_tokens=max_tokens, temperature=0.9),
                                              report_queue=True):
            out.append(item if isinstance(item, (Queued, Admitted)) else "chunk")
        return out

    try:
        await registry.load(MODEL)
        first = asyncio.create_task(items(24))
        while registry.get(MODEL).engine.running == 0:
            await asyncio.sleep(0.001)
        second = asyncio.create_task(items(4))
        await asyncio.sleep(0.02)
        third = asyncio.create_task(items(4))
        ran, waited_one, waited_two = await asyncio.gather(first, second, third)
        assert isinstance(ran[0], Admitted) and not any(isinstance(i, Queued) for i in ran)
        assert [i.position for i in waited_one if isinstance(i, Queued)] == [1]
        # Second in line, then first, unless the request ahead ran its 4 tokens between two looks.
        assert [i.position for i in waited_two if isinstance(i, Queued)] in ([2, 1], [2])
        for waited in (waited_one, waited_two):
            places = [i for i in waited if isinstance(i, Queued)]
            assert waited[: len(places)] == places and isinstance(waited[len(places)], Admitted)
            assert all(p.wait_seconds > 0 for p in places)
        # Without report_queue the first item is Admitted, as before.
        first = asyncio.create_task(turn(generation, chat, max_tokens=24))
        while registry.get(MODEL).engine.running == 0:
            await asyncio.sleep(0.001)
        plain = [item async for item in generation.generate(MODEL, chat, "", SamplingInput(max_tokens=2))]
        assert isinstance(plain[0], Admitted)
        await first
    finally:
        await registry.close()


async def test_a_paused_stream_resumes_from_its_kv_state_in_host_ram() -> None:
    """Fair share with the real model: with both slots running user A's streams, user B's request
    starts on the spare choice and user C's pauses one of A's (llama_state_seq_get_data), which
    resumes (…set_data) to its full length."""
    registry, generation = make(PARLEY_PARALLEL_SLOTS="2")
    try:
        await registry.load(MODEL)
        endless = SamplingInput(max_tokens=40, temperature=0, logit_bias=((2, -100.0),))  # no end of turn

        async def answer(owner: Owner, text: str, sampling: SamplingInput) -> tuple[str, object]:
            parts, last = [], None
            async for chunk in generated(generation, MODEL, [{"role": "user", "content": text}], "", sampling,
                                         owner=owner):
                parts.append(chunk.text)
                last = chunk
            return "".join(parts), last

        solo, _ = await answer(Owner("a"), "Count slowly from one to one hundred.", endless)
        a1 = asyncio.create_task(answer(Owner("a"), "Tell me about the sea, at length.", endless))
        a2 = asyncio.create_task(answer(Owner("a"), "Count slowly from one to one hundred.", endless))
        engine = registry.get(MODEL).engine
        while engine.running < 2:
            await asyncio.sleep(0.005)
        short = SamplingInput(max_tokens=3, temperature=0)
        (_, b), (_, c) = await asyncio.gather(answer(Owner("b"), "Hi", short), answer(Owner("c"), "Hello", short))
        (_, first), (text, paused) = await asyncio.gather(a1, a2)
        stats = scheduler(registry).stats
        assert (stats["paused"], stats["resumed"], stats["recomputed"]) == (1, 1, 0)
        assert b.finish_reason in ("stop", "length") and c.finish_reason in ("stop", "length")
        assert [r.usage.completion_tokens for r in (first, paused)] == [40, 40]
        assert paused.finish_reason == "length" and text[:12] == solo[:12]
    finally:
        await registry.close()


async def test_a_conversation_restarts_from_its_state_on_disk(tmp_path) -> None:
    """Three turns, the engine closed (its warm conversations go to disk) and loaded again on the same
    directory: the fourth turn evaluates only its new tokens, and answers as an engine without a disk
    that never stopped (greedy)."""
    kv_dir = str(tmp_path / "kv")
    questions = ["What is a compiler?", "And an interpreter?", "Which one is faster?", "Name one of each."]

    async def conversation(generation: GenerationService, chat: list[dict], asks: list[str]) -> list:
        lasts = []
        for question in asks:
            chat.append({"role": "user", "content": question})
            text, last = await turn(generation, chat, max_tokens=16, temperature=0)
            chat.append({"role": "assistant", "content": text})
            lasts.append(last)
        return lasts

    registry, generation = make(PARLEY_DISK_KV_CACHE_DIR=kv_dir)
    chat = [{"role": "system", "content": SYSTEM}]
    try:
        before = await conversation(generation, chat, questions[:3])
    finally:
        await registry.close()
    assert [p.suffix for p in (tmp_path / "kv").iterdir()] == [".kv"]  # the warm conversation, saved at close

    registry, generation = make(PARLEY_DISK_KV_CACHE_DIR=kv_dir)
    try:
        (after,) = await conversation(generation, chat, questions[3:])
        assert scheduler(registry).stats["restored_from_disk"] == 1
    finally:
        await registry.close()
    assert after.usage.cached_prompt_tokens >= before[-1].usage.prompt_tokens + before[-1].usage.completion_tokens - 2

    registry, generation = make()  # no disk: the same four turns, never stopped
    reference = [{"role": "system", "content": SYSTEM}]
    try:
        await conversation(generation, reference, questions)
    finally:
        await registry.close()
    assert reference == chat


async def test_an_idle_conversation_goes_to_disk_where_another_replica_finds_it(tmp_path) -> None:
    """Nothing runs for a while: the conversation is saved without a shutdown (a crash keeps it), and
    a second engine on the same directory, a replica sharing the volume, continues it from there."""
    kv_dir = str(tmp_path / "kv")
    first, generation = make(PARLEY_DISK_KV_CACHE_DIR=kv_dir)
    second, other = make(PARLEY_DISK_KV_CACHE_DIR=kv_dir)
    try:
        await second.load(MODEL)  # before anything is on disk: its writer's rescans find what comes
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a compiler?"}]
        text, last = await turn(generation, chat, max_tokens=16, temperature=0)
        deadline = time.monotonic() + 15
        while not list((tmp_path / "kv").glob("*.kv")):
            assert time.monotonic() < deadline, "the idle conversation was never saved"
            await asyncio.sleep(0.1)
        assert scheduler(first).stats["saved"] == 1
        chat += [{"role": "assistant", "content": text}, {"role": "user", "content": "And an interpreter?"}]
        while not len(scheduler(second)._disk):
            assert time.monotonic() < deadline + kv_store.RESCAN_SECONDS, "the other replica never indexed the file"
            await asyncio.sleep(0.1)
        _, continued = await turn(other, chat, max_tokens=4, temperature=0)
        assert scheduler(second).stats["restored_from_disk"] == 1
        assert continued.usage.cached_prompt_tokens >= last.usage.prompt_tokens + last.usage.completion_tokens - 2
    finally:
        await first.close()
        await second.close()


async def test_a_state_saved_under_another_kv_cache_shape_is_not_restored(tmp_path) -> None:
    kv_dir = str(tmp_path / "kv")
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a compiler?"}]
    registry, generation = make(PARLEY_DISK_KV_CACHE_DIR=kv_dir)
    try:
        text, _ = await turn(generation, chat, max_tokens=8, temperature=0)
    finally:
        await registry.close()
    assert list((tmp_path / "kv").glob("*.kv"))
    chat += [{"role": "assistant", "content": text}, {"role": "user", "content": "And an interpreter?"}]
    registry, generation = make(PARLEY_DISK_KV_CACHE_DIR=kv_dir, PARLEY_KV_CACHE_TOKENS="8192")
    try:
        _, last = await turn(generation, chat, max_tokens=4, temperature=0)
        assert scheduler(registry).stats["restored_from_disk"] == 0 and last.usage.cached_prompt_tokens == 0
    finally:
        await registry.close()
