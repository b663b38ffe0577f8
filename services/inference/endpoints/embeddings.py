"""Embeddings from request to vectors — shared by the Embed RPC and OpenAI's POST /v1/embeddings.

Order of a request: check the inputs' shape (400) → rate-limit check (429 with Retry-After) →
resolve the model (an embedding model, loaded on first use; a chat model is a 400) → tokenize and
check every input against the model's limit (400 naming the input, unless the request asks to
truncate) → the engine computes the vectors in batches → the tokens are recorded against the
caller's limits in the background. A remote model (engines.remote_embedding) skips the tokenizing:
its upstream takes the inputs as given, checks them and counts their tokens. OpenAI's JSON in and out lives here too (`parse_openai`,
`render_openai`); the servicer only moves bytes and messages.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.cache.client import CacheClient
from services.core.background import Background
from services.core.errors import InvalidArgument
from services.core.json_body import parse_object
from services.inference.engines import EMBEDDING, EmbeddingEngine
from services.inference.engines.fair import current_owner
from services.inference.metrics import EmbeddingTelemetry
from services.inference.models.registry import ModelRegistry
from services.inference.settings import InferenceSettings

MAX_INPUTS = 2048  # OpenAI's limit per request
ENCODINGS = ("float", "base64")

# An input: a text, or the model's own token ids without special tokens.
Input = str | list[int]


@dataclass(frozen=True)
class Embeddings:
    model: str
    vectors: np.ndarray  # float32, one row per input, in order
    tokens: list[int]  # per input, special tokens included; 0s from a remote model (its upstream counts the total)
    prompt_tokens: int


class EmbeddingService:
    def __init__(self, registry: ModelRegistry, settings: InferenceSettings, cache: CacheClient | None) -> None:
        self.registry = registry
        self.settings = settings
        self.cache = cache
        self._background = Background()

    async def close(self) -> None:
        await self._background.settle()

    async def embed(self, model_id: str, inputs: Sequence[Input], *, truncate: bool = False,
                    dimensions: int | None = None, timeout: float | None = None) -> Embeddings:
        """One vector per input. Counts a request against the caller's rate limit first, and the
        inputs' tokens after."""
        started = time.monotonic()
        observed = EmbeddingTelemetry(model_id or "default", len(inputs))
        try:
            check_inputs(inputs)
            if dimensions is not None and dimensions < 1:
                raise InvalidArgument("dimensions must be a positive integer")
            weight = await self.cache.check_rate_limit() if self.cache is not None else 1.0
            record = await self.registry.acquire(model_id, EMBEDDING)
            observed.resolved(record.entry.id)
            try:
                engine = record.engine
                assert isinstance(engine, EmbeddingEngine)
                size = output_size(record.entry.id, engine, bool(record.entry.params.get("matryoshka")), dimensions)
                deadline = started + (timeout if timeout is not None else self.settings.request_timeout_seconds)
                vectors, tokens, prompt_tokens = await engine.embed_inputs(inputs, deadline, truncate,
                                                                           current_owner(weight))
                normalized = engine.normalized
            finally:
                self.registry.done(record)
            if size < vectors.shape[1]:
                vectors = shorten(vectors, size, normalized)
            result = Embeddings(record.entry.id, vectors, tokens, prompt_tokens)
            if self.cache is not None:
                self._background.later(self.cache.record_usage(result.model, result.prompt_tokens, 0))
            observed.done(len(inputs), result.prompt_tokens, size)
            return result
        except Exception as exc:
            observed.failed(exc)
            raise
        finally:
            observed.end()


def check_inputs(inputs: Sequence[Input]) -> None:
    if not inputs:
        raise InvalidArgument("input must not be empty")
    if len(inputs) > MAX_INPUTS:
        raise InvalidArgument(f"input has {len(inputs)} items; at most {MAX_INPUTS} a request")
    for i, given in enumerate(inputs):
        if not given:
            raise InvalidArgument(f"input[{i}] is empty")


def output_size(model_id: str, engine: EmbeddingEngine, matryoshka: bool, dimensions: int | None) -> int:
    if dimensions is None or dimensions == engine.dimensions:
        return engine.dimensions
    if not matryoshka:
        raise InvalidArgument(f"model {model_id!r} makes {engine.dimensions}-dimensional vectors and cannot "
                              "shorten them; leave dimensions out")
    if dimensions > engine.dimensions:
        raise InvalidArgument(f"dimensions must be at most {engine.dimensions} for model {model_id!r}")
    return dimensions


def shorten(vectors: np.ndarray, size: int, normalized: bool) -> np.ndarray:
    """Matryoshka vectors: the first `size` values, back to unit length if the model normalises."""
    cut = vectors[:, :size]
    if not normalized:
        return np.ascontiguousarray(cut)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.maximum(norms, 1e-12)).astype(np.float32)


# --- OpenAI's wire format --------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIEmbeddingRequest:
    model: str
    inputs: list[Input]
    encoding_format: str
    dimensions: int | None
    truncate: bool


def _token_array(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _inputs(value: Any) -> list[Input]:
    """OpenAI's `input`: a string, an array of strings, an array of tokens or an array of token arrays."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if _token_array(value):
            return [list(value)]
        if all(_token_array(item) for item in value):
            return [list(item) for item in value]
    if isinstance(value, list) and not value:
        raise InvalidArgument("input must not be empty")
    raise InvalidArgument("input must be a string, an array of strings, an array of token ids or an array of "
                          "arrays of token ids")


def parse_openai(data: bytes) -> OpenAIEmbeddingRequest:
    body = parse_object(data)
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string")
    if "input" not in body:
        raise InvalidArgument("input is required")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise InvalidArgument(f"encoding_format must be \"float\" or \"base64\", got {encoding!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise InvalidArgument("dimensions must be a positive integer")
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise InvalidArgument("truncate must be a boolean")
    return OpenAIEmbeddingRequest(model, _inputs(body["input"]), encoding, dimensions, truncate)


def render_openai(result: Embeddings, encoding: str) -> bytes:
    """OpenAI's list of embedding objects. base64 is the little-endian float32 bytes, as the SDK reads them."""
    if encoding == "base64":
        rows: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in result.vectors]
    else:
        rows = result.vectors.tolist()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return json.dumps(body).encode()
