"""Sentence embeddings with transformers encoder models (BERT-like) on CUDA, MPS or CPU.

`source` is a model folder as sentence-transformers saves it (the bundled all-MiniLM-L6-v2 is one):
config.json, the tokenizer and weights, plus optionally modules.json, sentence_bert_config.json and
the pooling module's config. Vectors are computed as sentence-transformers does: the encoder's last
hidden states, pooled (mean over the real tokens unless the pooling config says cls or max), then
L2-normalised when modules.json has a Normalize module — or always, for a plain folder without
modules.json, since OpenAI clients take the dot product as the cosine. Nothing is downloaded.

Why torch here rather than llama.cpp (measured on this 2-core machine with all-MiniLM-L6-v2): a batch
of sentences runs ~2x faster padded to its longest sentence in torch (380 inputs/s at 32 short
sentences, 450/s at 256) than in one llama.cpp batch, where a non-causal model attends across the
whole batch (180/s and 40-140/s); llama.cpp answers a single sentence sooner (~4 ms against ~10 ms)
but needs a GGUF conversion at setup. The vectors are the reference implementation's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.engines.base import EngineError
from services.inference.engines.embedding import LocalEmbeddingEngine
from services.inference.engines.torch_engine import BYTES_PER_PARAMETER
from services.inference.engines.weights import safetensors_parameters
from services.inference.models.hardware import EngineSettings

POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: {exc}") from None


def sentence_transformers_config(folder: Path) -> tuple[str, bool, int | None]:
    """(pooling mode, whether vectors are normalised, max_seq_length) from a sentence-transformers folder."""
    modules = _read_json(folder / "modules.json")
    if modules is None:
        return "mean", True, None
    pooling, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            config = _read_json(folder / module.get("path", "") / "config.json") or {}
            chosen = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
            others = [key for key, value in config.items()
                      if key.startswith("pooling_mode_") and value and key not in POOLING_MODES]
            if others or len(chosen) > 1:
                raise EngineError(f"{folder}: pooling {', '.join(others or chosen)} is not supported "
                                  "(mean, cls or max)")
            pooling = chosen[0] if chosen else "mean"
    bert = _read_json(folder / "sentence_bert_config.json") or {}
    max_length = bert.get("max_seq_length")
    return pooling, normalize, int(max_length) if max_length else None


class TorchEmbeddingEngine(LocalEmbeddingEngine):
    engine_name = "torch"

    def _load(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise EngineError(f"embedding models need torch and transformers (pip install -r requirements/torch.txt): "
                              f"{exc}") from exc
        self._torch = torch
        transformers.utils.logging.disable_progress_bar()  # JSON logs only
        folder = Path(self.path)
        if not folder.is_dir():
            raise EngineError(f"embedding model not found: {folder} (expected a model folder)")
        self._pooling, self.normalized, max_length = sentence_transformers_config(folder)
        device = self.settings.device
        if device == "cpu":
            torch.set_num_threads(self.settings.threads)
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = transformers.AutoModel.from_pretrained(
                str(folder), local_files_only=True, dtype=getattr(torch, self.settings.dtype),
                **self.params.get("torch", {}))
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineError(f"transformers could not load {folder}: {exc}") from exc
        self._model = model.to(device).eval()
        self._device = device
        positions = int(getattr(model.config, "max_position_embeddings", 0) or 512)
        limit = self.settings.context_length or max_length or self._tokenizer.model_max_length
        self.context_length = min(int(limit), positions)
        self.dimensions = int(model.config.hidden_size)
        self.vocab_size = len(self._tokenizer)
        self._pad = self._tokenizer.pad_token_id or 0
        self._token_types = "token_type_ids" in self._tokenizer.model_input_names
        self._head, self._tail = self._special_tokens()

    def _close(self) -> None:
        self._model = None
        if getattr(self, "_torch", None) is not None and self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    @classmethod
    def estimate_mib(cls, path: str, settings: EngineSettings) -> int:
        """The parameters (from the safetensors headers) at the load dtype, plus 32 MiB for the
        activations of a full batch and the tokenizer."""
        parameters = safetensors_parameters(path)
        return int(parameters * BYTES_PER_PARAMETER.get(settings.dtype, 4)) // 2**20 + 32

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # One call for the whole list: the fast tokenizer splits it across its own threads.
        return [list(ids) for ids in
                self._tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text ([CLS] and [SEP] for BERT),
        found by tokenizing a word with and without them."""
        bare = self._tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self._tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return list(full[:start]), list(full[start + len(bare):])
        raise EngineError(f"{self.path}: cannot tell where the tokenizer puts its special tokens")

    def _with_special_tokens(self, tokens: list[int]) -> list[int]:
        return self._head + tokens + self._tail

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        torch = self._torch
        longest = max(len(seq) for seq in batch)
        ids = torch.full((len(batch), longest), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        inputs = {"input_ids": ids.to(self._device), "attention_mask": mask.to(self._device)}
        if self._token_types:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        with torch.inference_mode():
            hidden = self._model(**inputs).last_hidden_state.float()
            weights = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self._pooling == "cls":
                pooled = hidden[:, 0]
            elif self._pooling == "max":
                pooled = hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            if self.normalized:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return pooled.cpu().numpy().astype(np.float32, copy=False)
