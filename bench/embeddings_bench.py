"""Embeddings throughput: inputs/s for batches of 1, 32 and 256 short sentences, along two paths in one
run, with the bundled all-MiniLM-L6-v2:

  (a) transformers called directly in this process, as sentence-transformers computes the vectors
      (tokenize with padding, encoder forward, mean pooling, L2 normalisation) — the baseline
  (b) POST /v1/embeddings through Envoy (httpx, encoding_format base64 decoded to numpy as the
      `openai` SDK does): auth, rate limit, inference's batching engine and back

Both use the inference service's threads. The paths take turns within each round, so that a slow
spell of this shared machine weighs on both alike; every request embeds distinct sentences. Run by
`make bench` after the generation paths, or alone (quickly) with `make bench-embeddings`, which is
`bench/inference_bench.py --embeddings-only`.
"""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Callable

import httpx
import numpy as np

from services.inference.models.registry import BUNDLED_EMBEDDING, CatalogueEntry

MODEL = BUNDLED_EMBEDDING["id"]
BATCHES = (1, 32, 256)
# Requests per measurement, so that each lasts about a second on 2 cores.
REPEATS = {1: 40, 32: 4, 256: 1}
SUBJECTS = ("the harbour", "a red kite", "winter bread", "the night train", "old maps", "a tidy desk",
            "river stones", "the school choir")

Embed = Callable[[list[str]], np.ndarray]


def sentences(start: int, count: int) -> list[str]:
    return [f"Note {start + i}: {SUBJECTS[(start + i) % len(SUBJECTS)]} was mentioned in the meeting today."
            for i in range(count)]


def direct_path(threads: int) -> Embed:
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    folder = CatalogueEntry(**BUNDLED_EMBEDDING).path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()

    def embed(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            encoded = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

    return embed


def gateway_path(http: httpx.Client, url: str) -> Embed:
    def embed(texts: list[str]) -> np.ndarray:
        answer = http.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"})
        answer.raise_for_status()
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in answer.json()["data"]])

    return embed


def measure(url: str, token: str, threads: int, rounds: int) -> dict[tuple[str, int], float]:
    """Median inputs/s per (path, batch size); a first round warms up and is not counted."""
    with httpx.Client(timeout=300, headers={"authorization": f"Bearer {token}"}) as http:
        paths = {"(a) transformers in-process": direct_path(threads), "(b) /v1/embeddings via Envoy": gateway_path(http, url)}
        figures: dict[tuple[str, int], list[float]] = {(name, size): [] for name in paths for size in BATCHES}
        start = 0
        for round_ in range(rounds + 1):
            for size in BATCHES:
                for name, embed in paths.items():
                    repeats = REPEATS[size] if round_ else 1
                    began = time.perf_counter()
                    for _ in range(repeats):
                        vectors = embed(sentences(start, size))
                        start += size
                        assert vectors.shape == (size, 384)
                    if round_:
                        figures[(name, size)].append(repeats * size / (time.perf_counter() - began))
    return {key: statistics.median(values) for key, values in figures.items()}


def report(figures: dict[tuple[str, int], float], threads: int, rounds: int) -> None:
    names = sorted({name for name, _ in figures})
    direct = names[0]
    print(f"\nEmbeddings — {MODEL}, {threads} threads, short sentences (~16 tokens), inputs/s, median of "
          f"{rounds} interleaved round{'s' * (rounds > 1)}; ratio = path / (a), target >= 0.9 at batch 32\n")
    print(f"{'path':32} " + " ".join(f"{f'batch {size}':>11} {'ratio':>6}" for size in BATCHES))
    for name in names:
        cells = [f"{figures[(name, size)]:11.1f} {figures[(name, size)] / figures[(direct, size)]:6.3f}"
                 for size in BATCHES]
        print(f"{name:32} " + " ".join(cells))
