"""Models without a chat template, and encoder-decoders, on the torch engine: one tiny model of each
architecture (tests/tiny_models.py), taught one exchange in its own conversation format, answers it
through the generation service in the format chosen for it, with the same stops, max_tokens, usage,
seeds, cancellation and queue as any model; what a format cannot do is a 400 naming it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.core import config
from services.core.errors import InvalidArgument
from services.core.structured import PLAIN, Tool, make_structure
from services.inference.engines.torch_engine import Pieces
from services.inference.flow.service import Admitted, GenerationService, SamplingInput
from services.inference.models.hardware import probe
from services.inference.models.registry import ModelRegistry
from services.inference.servicer import model_pb
from services.inference.settings import InferenceSettings
from tests.tiny_models import ANSWER, ARCHITECTURES, make
from tests.tiny_models import tokenizer as tiny_tokenizer

DEFAULTS = {"gpt2": "dialogpt", "bloom": "transcript", "blenderbot-small": "blenderbot", "t5": "t5"}
HI = [{"role": "user", "content": "hi"}]
on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def generation(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GenerationService]:
    folder = tmp_path_factory.mktemp("tiny")
    catalogue = [{"id": kind, "source": str(make(kind, folder / kind, taught=True)), "engine": "torch"}
                 for kind in ARCHITECTURES]
    catalogue.append({**catalogue[0], "id": "gpt2-transcript", "params": {"chat_format": "transcript"}})
    (folder / "models.json").write_text(json.dumps(catalogue))
    settings = config.load(InferenceSettings, {
        "PARLEY_MODELS_FILE": str(folder / "models.json"), "PARLEY_DEFAULT_MODEL": "gpt2", "PARLEY_PRELOAD": "false",
        "PARLEY_CONTEXT_LENGTH": "512",
        "PARLEY_PARALLEL_SLOTS": "1", "PARLEY_QUEUE_DEPTH": "4"})
    registry = ModelRegistry(settings, probe())
    yield GenerationService(registry, settings)
    await registry.close()


async def answer(generation: GenerationService, model: str, messages=HI, prompt: str = "", structure=PLAIN,
                 **sampling):
    """(text, chunks, Admitted) of one request, greedy unless told."""
    chunks, admitted = [], None
    async for item in generation.generate(model, messages, prompt, SamplingInput(**{"temperature": 0, **sampling}),
                                          structure=structure):
        if isinstance(item, Admitted):
            admitted = item
        else:
            chunks.append(item)
    return "".join(c.text for c in chunks), chunks, admitted


@on_module_loop
@pytest.mark.parametrize("kind", ARCHITECTURES)
async def test_each_architecture_answers_in_the_format_chosen_for_it(generation: GenerationService, kind: str) -> None:
    text, chunks, admitted = await answer(generation, kind, max_tokens=16)
    assert text == ANSWER  # the prompt is written as the model learnt it, and the answer ends where it should
    assert len([c for c in chunks if c.text]) >= 2  # streamed, not one blob
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.usage.completion_tokens >= 3
    assert last.usage.prompt_tokens == admitted.prompt_tokens > 0
    record = generation.registry.get(kind)
    assert model_pb(record).chat_format == DEFAULTS[kind]
    assert record.engine.info()["encoder_decoder"] == (kind in ("blenderbot-small", "t5"))


@on_module_loop
async def test_the_catalogue_names_the_format(generation: GenerationService) -> None:
    text, _, _ = await answer(generation, "gpt2-transcript", max_tokens=4)
    assert text != ANSWER  # taught DialoGPT's way, asked in a transcript: it does not know this prompt
    assert model_pb(generation.registry.get("gpt2-transcript")).chat_format == "transcript"


@on_module_loop
@pytest.mark.parametrize("kind", ["blenderbot-small", "t5"])
async def test_an_encoder_decoders_answer_has_the_decoders_room_and_max_tokens(generation: GenerationService,
                                                                                kind: str) -> None:
    text, chunks, _ = await answer(generation, kind, max_tokens=2)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2
    assert ANSWER.startswith(text) and text != ANSWER
    first, _, _ = await answer(generation, kind, temperature=1.5, seed=7, max_tokens=6)
    again, _, _ = await answer(generation, kind, temperature=1.5, seed=7, max_tokens=6)
    assert first == again  # a seed repeats the answer


@on_module_loop
async def test_a_long_chat_keeps_the_newest_turns_the_encoder_takes(generation: GenerationService) -> None:
    history = [{"role": role, "content": f"turn {i} tell me a story about a cat"}
               for i in range(24) for role in ("user", "assistant")]
    text, chunks, admitted = await answer(generation, "blenderbot-small", [*history, *HI], max_tokens=4)
    window = generation.registry.get("blenderbot-small").engine.context_length
    assert window == 64  # BlenderBot's positions (max_position_embeddings)
    assert admitted.dropped > 0 and admitted.prompt_tokens <= window
    assert chunks[-1].usage.prompt_tokens == admitted.prompt_tokens
    with pytest.raises(InvalidArgument, match="context window of 64 tokens"):
        await answer(generation, "blenderbot-small", [], prompt=" ".join(["cat"] * 100), max_tokens=4)


@on_module_loop
async def test_what_a_format_cannot_do_is_a_400_naming_it(generation: GenerationService) -> None:
    tools = make_structure([Tool("get_weather", "", '{"type": "object"}')])
    with pytest.raises(InvalidArgument, match="tools: model 'gpt2' chats in the dialogpt format"):
        await answer(generation, "gpt2", structure=tools)
    schema = make_structure([], format="json_schema", schema='{"type": "object"}')
    with pytest.raises(InvalidArgument, match="response_format and tools: model 't5' is an encoder-decoder"):
        await answer(generation, "t5", structure=schema)


@on_module_loop
async def test_a_causal_model_without_a_template_still_keeps_to_a_schema(generation: GenerationService) -> None:
    schema = make_structure([], format="json_schema", schema=json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}))
    text, chunks, _ = await answer(generation, "bloom", max_tokens=24, structure=schema)
    assert json.loads(text) in ({"ok": True}, {"ok": False}), text


async def settled(engine) -> None:
    """Waits until the engine's slots are free (a worker stops at its next token)."""
    for _ in range(100):
        if engine.running == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the engine still runs a request")


@on_module_loop
async def test_an_encoder_decoder_stops_when_its_caller_leaves(generation: GenerationService,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    await answer(generation, "t5", max_tokens=1)  # loaded
    engine = generation.registry.get("t5").engine
    produced: list[int] = []
    decode = engine._decode

    def counted(slot, prompt, sampling):
        for token in decode(slot, prompt, sampling):
            produced.append(token)
            yield token

    monkeypatch.setattr(engine, "_decode", counted)
    monkeypatch.setattr(engine, "_is_end", lambda token: False)  # only max_tokens or the caller ends it
    stream = generation.generate("t5", HI, "", SamplingInput(temperature=0, max_tokens=400))
    async for item in stream:
        if not isinstance(item, Admitted):
            break
    await stream.aclose()
    await settled(engine)
    assert 0 < len(produced) < 100  # 400 were allowed


@on_module_loop
async def test_encoder_decoder_requests_wait_their_turn(generation: GenerationService) -> None:
    results = await asyncio.gather(*(answer(generation, "blenderbot-small", max_tokens=16) for _ in range(3)))
    assert [text for text, _, _ in results] == [ANSWER] * 3  # one slot, a queue of four: each in turn
    await settled(generation.registry.get("blenderbot-small").engine)


def test_blenderbot_small_pieces_stream_as_the_whole_answer_decodes(tmp_path: Path) -> None:
    from transformers import BlenderbotSmallTokenizer

    # BlenderBot-small's own tokenizer: "@@" ends a piece that its word goes on after.
    words = ["__start__", "__end__", "__null__", "__unk__", "hel@@", "lo", "there", "ca@@", "t", "a"]
    (tmp_path / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nhe l\nl o\n")
    tokenizer = BlenderbotSmallTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ids = [4, 5, 6, 9, 7, 8]
    streamed = b"".join(Pieces(tokenizer)(i) for i in ids).decode()
    assert streamed.rstrip() == tokenizer.decode(ids) == "hello there a cat"


def test_byte_level_pieces_stream_as_the_whole_answer_decodes() -> None:
    tokenizer = tiny_tokenizer("gpt2")
    ids = tokenizer("the cat sat on the mat, café ☕", add_special_tokens=False).input_ids
    assert b"".join(Pieces(tokenizer)(i) for i in ids).decode() == tokenizer.decode(ids)
