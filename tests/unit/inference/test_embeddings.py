"""Embeddings in-process with the real bundled all-MiniLM-L6-v2: the vectors against the reference
implementation, batching, limits, token inputs, tasks, and OpenAI's wire format."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from services.core import config
from services.core.errors import InvalidArgument, ResourceExhausted
from services.inference.endpoints.embeddings import EmbeddingService, parse_openai, render_openai
from services.inference.engines.embedding import EmbeddingEngine, LocalEmbeddingEngine
from services.inference.engines.torch_embedding import TorchEmbeddingEngine
from services.inference.flow.service import GenerationService, SamplingInput
from services.inference.models.hardware import EngineSettings, probe
from services.inference.models.registry import BUNDLED, BUNDLED_EMBEDDING, CatalogueEntry, ModelRegistry
from services.inference.settings import InferenceSettings
from tests.embedding_reference import SENTENCES, cosines, reference
from tests.unit.spans import exporter, named

MODEL = BUNDLED_EMBEDDING["id"]
# One event loop for the module's tests of the real model, so that it loads once for all of them.
on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry() -> AsyncIterator[ModelRegistry]:
    settings = config.load(InferenceSettings, {"PARLEY_PARALLEL_SLOTS": "1", "PARLEY_CONTEXT_LENGTH": "1024",
                                               "PARLEY_QUEUE_DEPTH": "4"})
    registry = ModelRegistry(settings, probe())
    yield registry
    await registry.close()


@pytest.fixture
def service(registry: ModelRegistry) -> EmbeddingService:
    return EmbeddingService(registry, registry.settings, cache=None)


@on_module_loop
async def test_catalogue_has_both_tasks(registry: ModelRegistry) -> None:
    assert registry.get(BUNDLED["id"]).entry.task == "chat"
    assert registry.get(MODEL).entry.task == "embedding"
    assert registry.get("", "embedding").entry.id == MODEL  # the default embedding model
    assert registry.get("").entry.id == BUNDLED["id"]


@on_module_loop
async def test_vectors_match_the_reference(service: EmbeddingService) -> None:
    result = await service.embed(MODEL, list(SENTENCES))
    assert result.vectors.shape == (len(SENTENCES), 384) and result.vectors.dtype == np.float32
    similarity = cosines(result.vectors, reference(SENTENCES))
    assert similarity.min() >= 0.999, similarity
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    # Similar meanings land closer than unrelated ones: the vectors carry meaning, not noise.
    v = result.vectors
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert result.tokens[6] == 3  # [CLS] ok [SEP]
    assert result.prompt_tokens == sum(result.tokens)


@on_module_loop
async def test_each_request_is_one_genai_span(service: EmbeddingService) -> None:
    spans = exporter()
    spans.clear()
    result = await service.embed("", ["one", "two"])  # the default embedding model
    with pytest.raises(InvalidArgument):
        await service.embed(MODEL, [""])
    ok, failed = named(spans.get_finished_spans(), f"embeddings {MODEL}")
    assert ok.attributes["gen_ai.operation.name"] == "embeddings"
    assert ok.attributes["gen_ai.usage.input_tokens"] == result.prompt_tokens == 6
    assert ok.attributes["gen_ai.embeddings.dimension.count"] == 384
    assert ok.attributes["gen_ai.response.model"] == MODEL and ok.attributes["parley.embedding.inputs"] == 2
    assert not failed.status.is_ok and failed.attributes["error.type"] == "InvalidArgument"


@on_module_loop
async def test_a_list_is_computed_in_batches_with_the_same_vectors(service: EmbeddingService,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [f"Sentence number {i} talks about {'cats' if i % 2 else 'the weather in spring'}." for i in range(40)]
    alone = [(await service.embed(MODEL, [t])).vectors[0] for t in texts[:3]]
    engine = service.registry.get(MODEL).engine
    sizes: list[int] = []
    forward = TorchEmbeddingEngine._forward

    def counting(self: TorchEmbeddingEngine, batch: list[list[int]]) -> np.ndarray:
        sizes.append(len(batch))
        return forward(self, batch)

    monkeypatch.setattr(TorchEmbeddingEngine, "_forward", counting)
    together = (await service.embed(MODEL, texts)).vectors
    assert sizes == [40], f"40 short inputs should take one forward pass, took {sizes}"
    # Padding to the batch's longest input changes nothing (in order, too).
    assert np.allclose(together[:3], np.stack(alone), atol=1e-5)
    assert engine is not None and engine.running == 0 and engine.waiting == 0
    # 22.7 M float32 parameters (from the safetensors header) and room for a batch: the budget's share.
    assert service.registry.get(MODEL).memory_mib == 22_713_728 * 4 // 2**20 + 32


@on_module_loop
async def test_over_long_input_is_refused_naming_it_or_truncated_on_request(service: EmbeddingService) -> None:
    long_text = "word " * 400
    with pytest.raises(InvalidArgument, match=r"input\[1\] is 402 tokens .* at most 256"):
        await service.embed(MODEL, ["short", long_text])
    cut = await service.embed(MODEL, ["short", long_text], truncate=True)
    assert cut.tokens == [3, 256]
    assert np.allclose(cut.vectors[1], reference([long_text])[0], atol=1e-5)  # as sentence-transformers cuts


@on_module_loop
async def test_token_arrays_are_the_models_own_ids(service: EmbeddingService, registry: ModelRegistry) -> None:
    text = "Paris is the capital of France."
    await service.embed(MODEL, ["warm up"])
    engine = registry.get(MODEL).engine
    assert isinstance(engine, EmbeddingEngine)
    ids = engine.tokenize([text])[0][1:-1]  # without [CLS] and [SEP]
    by_text, by_tokens = (await service.embed(MODEL, [text])).vectors, (await service.embed(MODEL, [ids])).vectors
    assert np.allclose(by_text, by_tokens, atol=1e-6)
    with pytest.raises(InvalidArgument, match=r"input\[1\]: token 999999 is not in the vocabulary"):
        await service.embed(MODEL, [ids, [1, 999999]])


@on_module_loop
async def test_bad_requests(service: EmbeddingService) -> None:
    with pytest.raises(InvalidArgument, match="must not be empty"):
        await service.embed(MODEL, [])
    with pytest.raises(InvalidArgument, match=r"input\[1\] is empty"):
        await service.embed(MODEL, ["a", ""])
    with pytest.raises(InvalidArgument, match="cannot shorten"):
        await service.embed(MODEL, ["a"], dimensions=128)
    assert (await service.embed(MODEL, ["a"], dimensions=384)).vectors.shape == (1, 384)


@on_module_loop
async def test_each_task_refuses_the_other(service: EmbeddingService, registry: ModelRegistry) -> None:
    with pytest.raises(InvalidArgument, match="is a chat model"):
        await service.embed(BUNDLED["id"], ["hello"])
    generation = GenerationService(registry, registry.settings)
    with pytest.raises(InvalidArgument, match="is an embedding model.*POST /v1/embeddings"):
        async for _ in generation.generate(MODEL, [{"role": "user", "content": "Hi"}], "", SamplingInput()):
            pass
    assert registry.get(BUNDLED["id"]).state == "available"  # refused before anything loaded


class SlowEngine(LocalEmbeddingEngine):
    """A fake model for the scheduler's logic: each pass waits until released."""

    engine_name = "fake"

    def __init__(self, queue_depth: int) -> None:
        super().__init__("fake", "", EngineSettings("fake", "cpu", 1, 0, "float32", "", 0, 1, queue_depth=queue_depth),
                         {})
        self.release = threading.Event()
        self.passes: list[int] = []

    def _load(self) -> None:
        self.context_length, self.dimensions, self.vocab_size = 16, 2, 100

    def _close(self) -> None:
        pass

    @classmethod
    def estimate_mib(cls, path: str, settings: EngineSettings) -> int:
        return 0

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[len(t)] for t in texts]

    def _with_special_tokens(self, tokens: list[int]) -> list[int]:
        return [0, *tokens, 1]

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        self.release.wait(5)
        self.passes.append(len(batch))
        return np.array([[len(seq), seq[-1]] for seq in batch], dtype=np.float32)


@on_module_loop
async def test_scheduler_queues_batches_across_requests_and_refuses_when_full() -> None:
    engine = SlowEngine(queue_depth=2)
    await engine.load()
    try:
        deadline = time.monotonic() + 30
        first = asyncio.ensure_future(engine.embed([[1, 2]], deadline))
        await asyncio.sleep(0.05)  # the worker holds the first request
        queued = [asyncio.ensure_future(engine.embed([[i] * (i + 1) for i in range(3)], deadline)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert engine.waiting == 2
        with pytest.raises(ResourceExhausted, match="busy"):
            await engine.embed([[1]], deadline)
        engine.release.set()
        assert (await first).tolist() == [[2, 2]]
        for task in queued:
            # In the request's order, though computed sorted by length.
            assert (await task).tolist() == [[1, 0], [2, 1], [3, 2]]
        assert engine.passes == [1, 6]  # the two queued requests shared one pass
    finally:
        engine.release.set()
        await engine.close()


@on_module_loop
async def test_a_caller_that_leaves_is_dropped() -> None:
    engine = SlowEngine(queue_depth=4)
    await engine.load()
    try:
        deadline = time.monotonic() + 30
        first = asyncio.ensure_future(engine.embed([[1]], deadline))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(engine.embed([[1], [2]], deadline))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches embed()
        engine.release.set()
        await first
        assert engine.passes == [1]
        with pytest.raises(Exception, match="deadline"):
            await engine.embed([[1]], time.monotonic() - 1)
    finally:
        engine.release.set()
        await engine.close()


def test_openai_request_shapes() -> None:
    def inputs(value: object) -> list:
        return parse_openai(json.dumps({"model": "m", "input": value}).encode()).inputs

    assert inputs("hi") == ["hi"]
    assert inputs(["a", "b"]) == ["a", "b"]
    assert inputs([1, 2, 3]) == [[1, 2, 3]]
    assert inputs([[1, 2], [3]]) == [[1, 2], [3]]
    for bad in (["a", 1], [[1], "a"], {"a": 1}, None, [True]):
        with pytest.raises(InvalidArgument, match="input must be"):
            inputs(bad)
    with pytest.raises(InvalidArgument, match="must not be empty"):
        inputs([])
    with pytest.raises(InvalidArgument, match="encoding_format"):
        parse_openai(b'{"input": "a", "encoding_format": "int8"}')
    with pytest.raises(InvalidArgument, match="dimensions"):
        parse_openai(b'{"input": "a", "dimensions": 0}')
    with pytest.raises(InvalidArgument, match="input is required"):
        parse_openai(b'{"model": "m"}')
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        parse_openai(b"{")


def test_openai_rendering_float_and_base64() -> None:
    from services.inference.endpoints.embeddings import Embeddings

    vectors = np.array([[0.25, -1.5, 3.0], [1e-8, 0.0, -0.125]], dtype=np.float32)
    result = Embeddings("m", vectors, [3, 4], 7)
    plain = json.loads(render_openai(result, "float"))
    assert plain["object"] == "list" and plain["model"] == "m"
    assert plain["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in plain["data"]] == [0, 1] and plain["data"][0]["object"] == "embedding"
    assert np.allclose(plain["data"][1]["embedding"], vectors[1])
    packed = json.loads(render_openai(result, "base64"))
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == vectors[0].tolist()


def test_bundled_model_is_installed() -> None:
    assert Path(CatalogueEntry(**BUNDLED_EMBEDDING).path(), "model.safetensors").is_file()
