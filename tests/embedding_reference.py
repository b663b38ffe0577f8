"""The reference vectors for all-MiniLM-L6-v2, computed here as sentence-transformers computes them
(sentence-transformers itself is not a dependency): the encoder's last hidden states, mean-pooled
over the attention mask with inputs cut at max_seq_length 256, then L2-normalised."""

from __future__ import annotations

import functools

import numpy as np

from services.inference.models.registry import BUNDLED_EMBEDDING, CatalogueEntry

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaped over a sleepy hound.",
    "Paris is the capital of France.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "I'd like a cup of green tea, please!",
    "Embeddings map text to vectors; similar meanings land close together.",
    "ok",
    "Ünïcödé, emoji 🙂 and numbers 12345 mixed together in one sentence — with punctuation?!",
)


@functools.cache
def _model() -> tuple[object, object]:
    import transformers

    folder = CatalogueEntry(**BUNDLED_EMBEDDING).path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return tokenizer, model


def reference(texts: list[str] | tuple[str, ...]) -> np.ndarray:
    import torch

    tokenizer, model = _model()
    with torch.inference_mode():
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
