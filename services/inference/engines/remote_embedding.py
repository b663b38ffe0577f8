"""A remote embedding model: the vectors come from an OpenAI-compatible upstream's `POST /embeddings`
(vLLM, llama-server started with --embeddings, TEI, Ollama), through the same upstream pool as remote
chat models (engines.upstream.UpstreamPool: balancing, health checks, failover, error mapping).

Catalogue entry: {"id": "...", "task": "embedding", "engine": "remote", "source": "http://host:port/v1"
(or a list of replicas' URLs), "params": {"model": "<upstream model name>", "api_key_env": "...",
"timeout_seconds": 60, "matryoshka": false}}.

The inputs travel as given (texts, or token arrays in the upstream's vocabulary); the upstream
tokenizes them and checks them against its limits (its 400 is a 400), and its usage is what is metered
(an estimate of 4 UTF-8 bytes a token when it sends none). It reports only the request's total, so
the per-input token counts of the Embed RPC are 0. At load one probe embedding tells the vectors'
size and whether the upstream normalises them, so `dimensions` (matryoshka models) and
`encoding_format` work here as for local models.

Unlike remote chat models (engines.remote: an in-flight limit and the fair-share line), embedding
requests are not bounded nor queued here: each goes upstream at once and the upstream queues them —
a batch of inputs is one short call, not a stream that holds its place for long.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from services.core.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.inference.engines.base import EngineError
from services.inference.engines.embedding import EmbeddingEngine
from services.inference.engines.fair import Owner
from services.inference.engines.remote import BYTES_PER_TOKEN
from services.inference.engines.upstream import PoolBacked, UpstreamPool, describe
from services.inference.models.hardware import EngineSettings

PROBE = "How long is a vector?"


class RemoteEmbeddingEngine(PoolBacked, EmbeddingEngine):
    engine_name = "remote"

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict[str, Any]) -> None:
        super().__init__(model_id, path, settings, params)
        self.pool = UpstreamPool(model_id, path, params, self._learn_context)
        self._running = 0

    async def load(self) -> None:
        """Opens the pool (fails when no upstream answers) and embeds one probe text: its vector's
        size and length are the model's."""
        await self.pool.open()
        try:
            vectors, _, _ = await self.embed_inputs([PROBE], time.monotonic() + self.pool.timeout)
        except Exception as exc:
            await self.pool.close()
            message = getattr(exc, "message", None) or describe(exc)
            raise EngineError(f"model {self.model_id}: the upstream could not embed a probe text: {message}") from exc
        self.dimensions = int(vectors.shape[1])
        self.normalized = abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-3

    async def close(self) -> None:
        await self.pool.close()

    def _learn_context(self, model: dict[str, Any]) -> None:
        """The longest input, where the upstream's model list says (vLLM's max_model_len): for
        /v1/models only; the upstream checks its inputs itself."""
        size = model.get("max_model_len")
        if isinstance(size, int) and size > 0:
            self.context_length = size

    async def embed_inputs(self, inputs: Sequence[str | list[int]], deadline: float, truncate: bool = False,
                           owner: Owner | None = None) -> tuple[np.ndarray, list[int], int]:
        """The upstream tokenizes, checks and counts the inputs: it reports only the total (and
        schedules them: `owner` is not its concern)."""
        if truncate:
            raise InvalidArgument(f"model {self.model_id!r} is remote and cannot truncate inputs; leave truncate out")
        texts = [i for i in inputs if isinstance(i, str)]
        if texts and len(texts) != len(inputs):
            raise InvalidArgument(f"model {self.model_id!r} is remote: send texts or token arrays, not both "
                                  "in one request")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before its embeddings were computed")
        body = {"model": self.pool.remote_model, "input": list(inputs), "encoding_format": "float"}
        self._running += 1
        try:
            async with asyncio.timeout(remaining):
                call = await self.pool.send("embeddings", body)
                outcome, error = "ok", ""
                try:
                    answer = json.loads(await call.response.aread())
                    return _vectors(answer, len(inputs)), [0] * len(inputs), _prompt_tokens(answer, inputs)
                except httpx.HTTPError as exc:
                    outcome, error = "cut", describe(exc)
                    raise Unavailable(f"model {self.model_id!r}: upstream {call.upstream.url} failed mid-answer: "
                                      f"{error}") from exc
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    outcome, error = "malformed", describe(exc)
                    raise Unavailable(f"model {self.model_id!r}: upstream {call.upstream.url} answered malformed "
                                      f"embeddings: {error}") from exc
                except BaseException:
                    outcome = "cancelled"
                    raise
                finally:
                    self.pool.end(call.upstream, call.span, outcome, error)
                    await call.response.aclose()
        except TimeoutError:
            raise DeadlineExceeded(f"model {self.model_id!r}: the upstream did not answer before the request's "
                                   "deadline") from None
        finally:
            self._running -= 1


def _vectors(answer: dict[str, Any], count: int) -> np.ndarray:
    """The answer's vectors in input order (OpenAI's `data[].index`; float arrays)."""
    rows: list[Any] = [None] * count
    for item in answer["data"]:
        rows[int(item["index"])] = item["embedding"]
    if any(row is None for row in rows):
        raise ValueError(f"{sum(row is None for row in rows)} of {count} vectors missing")
    vectors = np.asarray(rows, dtype=np.float32)
    if vectors.ndim != 2 or not vectors.shape[1]:
        raise ValueError("the vectors are not rows of one size")
    return vectors


def _prompt_tokens(answer: dict[str, Any], inputs: Sequence[str | list[int]]) -> int:
    """The upstream's count, else an estimate (token arrays count as they are)."""
    given = (answer.get("usage") or {}).get("prompt_tokens")
    if isinstance(given, int) and given >= 0:
        return given
    return sum(len(i) if isinstance(i, list) else -(-len(i.encode("utf-8")) // BYTES_PER_TOKEN) for i in inputs)
