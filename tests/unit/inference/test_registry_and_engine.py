"""The model registry and the llama.cpp engine in-process, with the real bundled model."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from services.core import config
from services.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.inference.engines.base import EXACT_COUNT_MESSAGES
from services.inference.flow.fitting import Fit
from services.inference.flow.service import Admitted, GenerationService, SamplingInput
from services.inference.models.hardware import probe
from services.inference.models.registry import BUNDLED, CatalogueEntry, ModelRegistry
from services.inference.settings import InferenceSettings

MODEL = BUNDLED["id"]


def make_registry(tmp_path: Path, entries: list[dict] | None = None, **env: str) -> tuple[ModelRegistry, GenerationService]:
    values = {"PARLEY_PARALLEL_SLOTS": "1", "PARLEY_CONTEXT_LENGTH": "1024", "PARLEY_QUEUE_DEPTH": "0", **env}
    if entries is not None:
        path = tmp_path / "models.json"
        path.write_text(json.dumps(entries))
        values["PARLEY_MODELS_FILE"] = str(path)
    settings = config.load(InferenceSettings, values)
    registry = ModelRegistry(settings, probe())
    return registry, GenerationService(registry, settings)


def copy_of_bundled(tmp_path: Path, name: str) -> dict:
    target = tmp_path / f"{name}.gguf"
    shutil.copyfile(CatalogueEntry(**BUNDLED).path(), target)
    return {"id": name, "source": str(target)}


async def generated(generation: GenerationService, *args, **kwargs):
    """generation.generate's chunks, without its first item (Admitted)."""
    async for item in generation.generate(*args, **kwargs):
        if not isinstance(item, Admitted):
            yield item


async def collect(generation: GenerationService, model: str, text: str, **sampling) -> tuple[str, object]:
    parts, last = [], None
    async for chunk in generated(generation, model, [{"role": "user", "content": text}], "", SamplingInput(**sampling)):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


async def test_model_loads_on_first_use_and_unloads(tmp_path: Path) -> None:
    registry, generation = make_registry(tmp_path)
    assert registry.get(MODEL).state == "available"
    text, last = await collect(generation, MODEL, "Hi", max_tokens=4, temperature=0)
    assert registry.get(MODEL).state == "ready" and last.usage.completion_tokens >= 1
    await registry.unload(MODEL)
    assert registry.get(MODEL).state == "available" and registry.get(MODEL).engine is None
    await registry.close()


async def test_unknown_and_malformed_models(tmp_path: Path) -> None:
    registry, generation = make_registry(tmp_path)
    with pytest.raises(NotFound):
        await collect(generation, "missing-model", "Hi")
    with pytest.raises(InvalidArgument):
        await collect(generation, "../etc/passwd", "Hi")


async def test_failed_load_reports_its_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    registry, _ = make_registry(tmp_path, [BUNDLED, {"id": "broken", "source": str(broken)}])
    with pytest.raises(Unavailable, match="failed to load"):
        await registry.load("broken")
    record = registry.get("broken")
    assert record.state == "failed" and record.error


async def test_budget_evicts_the_least_recently_used_idle_model(tmp_path: Path) -> None:
    entries = [BUNDLED, copy_of_bundled(tmp_path, "second"), copy_of_bundled(tmp_path, "third")]
    registry, generation = make_registry(tmp_path, entries, PARLEY_MEMORY_BUDGET_MIB="400")
    await registry.load(MODEL)
    await registry.load("second")
    assert registry.get(MODEL).state == "available"  # evicted: the budget holds about one model
    assert registry.get("second").state == "ready"
    await registry.close()


async def test_budget_refuses_when_every_loaded_model_is_busy(tmp_path: Path) -> None:
    entries = [BUNDLED, copy_of_bundled(tmp_path, "second")]
    registry, _ = make_registry(tmp_path, entries, PARLEY_MEMORY_BUDGET_MIB="400")
    busy = await registry.acquire(MODEL)
    with pytest.raises(ResourceExhausted, match="PARLEY_MEMORY_BUDGET_MIB"):
        await registry.load("second")
    assert registry.get(MODEL).state == "ready"
    registry.done(busy)
    await registry.close()


async def test_idle_models_unload_after_keep_alive(tmp_path: Path) -> None:
    registry, _ = make_registry(tmp_path, PARLEY_KEEP_ALIVE_SECONDS="0.4")
    await registry.load(MODEL)
    registry.start_reaper()
    await asyncio.sleep(1.0)
    assert registry.get(MODEL).state == "available"
    await registry.close()


async def test_next_turn_reuses_the_cached_prefix(tmp_path: Path) -> None:
    registry, generation = make_registry(tmp_path, PARLEY_PARALLEL_SLOTS="2")
    chat = [{"role": "user", "content": "Tell me about the sea in one sentence."}]
    first_text, first = await collect(generation, MODEL, chat[0]["content"], max_tokens=20, temperature=0)
    chat += [{"role": "assistant", "content": first_text}, {"role": "user", "content": "And the sky?"}]
    last = None
    async for chunk in generated(generation, MODEL, chat, "", SamplingInput(max_tokens=5, temperature=0)):
        last = chunk
    # Everything up to the end of the first prompt (at least) came from the slot's KV cache.
    assert last.usage.cached_prompt_tokens >= first.usage.prompt_tokens - 1
    await registry.close()


async def test_cancellation_frees_the_engine_within_100_ms(tmp_path: Path) -> None:
    registry, generation = make_registry(tmp_path)
    await registry.load(MODEL)
    engine = registry.get(MODEL).engine
    received = asyncio.Event()

    async def consume() -> None:
        async for _ in generated(generation, MODEL, [{"role": "user", "content": "Tell a long story."}], "",
                                           SamplingInput(max_tokens=2000)):
            received.set()

    task = asyncio.create_task(consume())
    await received.wait()
    assert engine.running == 1
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while engine.running:
        await asyncio.sleep(0.001)
    assert time.monotonic() - cancelled_at < 0.1
    await registry.close()


async def test_count_tokens_matches_the_prompt(tmp_path: Path) -> None:
    registry, generation = make_registry(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    total, per_message, context = await generation.count_tokens(MODEL, messages)
    assert context == 1024 and len(per_message) == 2 and all(n > 0 for n in per_message)
    _, last = await collect(generation, MODEL, "x", max_tokens=1)  # warm
    engine = registry.get(MODEL).engine
    assert total == len(engine.prompt_tokens(messages, None))
    await registry.close()


async def test_long_chats_are_counted_in_linear_time_and_add_up(tmp_path: Path) -> None:
    registry, generation = make_registry(tmp_path)
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} " * (1 + i % 3)}
            for i in range(EXACT_COUNT_MESSAGES + 40)]
    total, shares, _ = await generation.count_tokens(MODEL, chat)
    engine = registry.get(MODEL).engine
    rendered = len(engine._tokenize(engine._render(chat, add_generation_prompt=False)))
    assert sum(shares) == rendered and total == len(engine.prompt_tokens(chat, None)) and all(n > 0 for n in shares)
    _, exact, _ = await generation.count_tokens(MODEL, chat[:EXACT_COUNT_MESSAGES])  # rendered prefix by prefix
    assert all(abs(a - b) <= 3 for a, b in zip(exact[1:], shares[1:EXACT_COUNT_MESSAGES])), (exact, shares)
    with pytest.raises(InvalidArgument, match="at most 4096 messages"):
        await generation.count_tokens(MODEL, [{"role": "user", "content": "x"}] * 4097)
    await registry.close()


async def test_a_request_too_large_for_an_unloaded_model_is_refused_without_loading_it(tmp_path: Path) -> None:
    """The bound before a load is the window the load would ask for (1,024 tokens here: 8,192
    characters); nothing is loaded for a request that could never fit."""
    registry, generation = make_registry(tmp_path)
    huge = [{"role": "user", "content": "a" * 9000}]
    with pytest.raises(InvalidArgument, match="9000 characters; at most 8192"):
        await generation.count_tokens(MODEL, huge)
    with pytest.raises(InvalidArgument, match="9000 characters; at most 8192"):
        await collect(generation, MODEL, "a" * 9000)
    with pytest.raises(InvalidArgument, match="the newest message and the system prompt hold 9000"):
        async for _ in generation.generate(MODEL, huge, "", SamplingInput(), fit=Fit(keep_last=1)):
            pass
    assert registry.get(MODEL).state == "available" and registry.get(MODEL).engine is None
    await registry.close()


def test_catalogue_rejects_bad_entries(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="model id"):
        make_registry(tmp_path, [{"id": "bad id!", "source": "/x"}, BUNDLED])
    with pytest.raises(config.ConfigError, match="PARLEY_DEFAULT_MODEL"):
        make_registry(tmp_path, [{"id": "other", "source": "/x"}])


async def test_a_model_always_decodes_on_its_own_thread(tmp_path: Path) -> None:
    """llama.cpp's OpenMP keeps a thread team per calling thread; decoding from changing threads
    built extra teams that spun idle and slowed decoding by a third on 2 cores."""
    registry, generation = make_registry(tmp_path)
    record = await registry.acquire(MODEL)
    scheduler = record.engine._scheduler
    registry.done(record)
    seen: set[str] = set()
    step = scheduler._decode_once

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return step(*args, **kwargs)

    scheduler._decode_once = spy
    for i in range(3):
        # Tokenizing runs on the shared pool meanwhile; the decoding must not follow it around.
        await asyncio.gather(collect(generation, MODEL, f"Count to {i}", max_tokens=3, temperature=0),
                             asyncio.to_thread(time.sleep, 0.01))
    assert len(seen) == 1 and next(iter(seen)).startswith("decode-")
    await registry.close()


async def test_the_memory_made_room_for_is_the_memory_reported_once_loaded(tmp_path: Path) -> None:
    """One estimate: from the GGUF header before the model loads, and what the loaded engine reports."""
    from services.inference.engines import engine_class
    from services.inference.engines.weights import gguf_metadata

    registry, _ = make_registry(tmp_path)
    record = registry.get(MODEL)
    chosen = registry.engine_settings(record.entry)
    before = engine_class(chosen.engine).estimate_mib(record.entry.path(), chosen)
    await registry.load(MODEL)
    try:
        assert record.memory_mib == before > 0
        engine = record.engine
        # The header reader agrees with llama.cpp's own reading of the file.
        read = gguf_metadata(record.entry.path())
        for key in ("general.architecture", "llama.block_count", "llama.attention.head_count_kv",
                    "llama.embedding_length", "llama.context_length"):
            assert str(read[key]) == engine._metadata[key]
    finally:
        await registry.close()


async def test_a_loaded_model_keeps_the_fingerprint_of_the_weights_it_loaded(tmp_path: Path) -> None:
    """The response cache keys answers by the weights that wrote them: a file replaced on disk while
    the model runs changes the fingerprint only once it is loaded again."""
    entry = copy_of_bundled(tmp_path, "copy")
    registry, _ = make_registry(tmp_path, [BUNDLED, entry])
    record = registry.get("copy")
    before = record.fingerprint()
    await registry.load("copy")
    assert record.fingerprint() == before
    source = Path(entry["source"])
    replacement = tmp_path / "new.gguf"  # a new file, one byte longer, moved over the old one (as a deploy does)
    replacement.write_bytes(source.read_bytes() + b"\0")
    replacement.replace(source)
    assert record.entry.fingerprint() != before
    assert record.fingerprint() == before  # still the loaded weights'
    await registry.unload("copy")
    after = record.fingerprint()
    assert after == record.entry.fingerprint() and after != before
    await registry.load("copy")
    assert record.fingerprint() == after
    await registry.close()
