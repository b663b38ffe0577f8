"""llama.cpp through llama-cpp-python, for GGUF files: one context, many sequences, one decode loop.

The model has one llama.cpp context with a unified KV cache shared by `resident_sequences` sequence
ids. One thread per model runs the loop (services.inference.engines.batch.BatchScheduler): each step
it puts one token of every running choice and chunks of new prompts, up to `batch_tokens`, into one
`llama_batch`, decodes it once and samples every choice from its own logits row with its own sampler
chain. A finished conversation's KV cells stay, tagged by its sequence id, so its next turn only
evaluates the new tokens; shared prefixes (a system prompt) are copied between sequences instead of
evaluated again; evicted conversations park their KV state in host RAM, and idle ones on disk
(engines.kv_store), where the next turn finds them after a restart.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from pathlib import Path
from typing import Any

from services.inference.engines.base import EngineError
from services.inference.engines.batch import BatchScheduler, logits_rows
from services.inference.engines.kv_store import DiskKvStore, fingerprint
from services.inference.engines.local import TokenEngine
from services.inference.engines.sequence import Request
from services.inference.engines.weights import gguf_metadata
from services.inference.models.chat_template import TemplateError, model_template
from services.inference.models.hardware import EngineSettings

log = logging.getLogger("parley.engine")


def llama_cpp_patches() -> dict[str, int]:
    """Parley's patches to llama.cpp (patches/llama.cpp/, built by tools/patched_llama_cpp.py) that the
    llama.cpp in use carries, each with what of it is compiled in for this CPU: `fa_runs`, flash
    attention for short steps over a long KV cache (1); `q4_1_tiles`, Q4_1 weights times several
    tokens: the widest kernel (512: AVX-512, 256: AVX2, 0: none, not x86). Empty for a stock build."""
    import llama_cpp

    for path in sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-cpu*")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        found = {}
        for name in ("fa_runs", "q4_1_tiles"):
            marker = getattr(lib, f"ggml_cpu_parley_{name}", None)
            if marker is not None:
                marker.restype = ctypes.c_int
                found[name] = int(marker())
        return found
    return {}


class LlamaCppEngine(TokenEngine):
    engine_name = "llama.cpp"
    supports_choices = True
    supports_logprobs = True

    def _load(self) -> None:
        try:
            import llama_cpp
            from llama_cpp import _internals
            from llama_cpp._logger import set_verbose
        except ImportError as exc:  # pragma: no cover - a broken install
            raise EngineError(f"llama-cpp-python is not installed: {exc}") from exc

        if not os.path.isfile(self.path):
            raise EngineError(f"model file not found: {self.path}")
        set_verbose(False)
        llama_cpp.llama_backend_init()
        s = self.settings
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = s.gpu_layers
        for key, value in self.params.get("llama", {}).get("model", {}).items():
            setattr(model_params, key, value)
        try:
            model = _internals.LlamaModel(path_model=self.path, params=model_params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {self.path}: {exc}") from exc
        self._model = model
        self._metadata = model.metadata()
        self.vocab_size = model.n_vocab()
        trained = model.n_ctx_train()
        self.context_length = min(s.context_length, trained) if trained > 0 else s.context_length
        kv_tokens = _kv_cells(self.path, self._metadata, s)
        ctx_params = self._context_params(llama_cpp, kv_tokens)
        try:
            context = _internals.LlamaContext(model=model, params=ctx_params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            model.close()
            raise EngineError(f"llama.cpp could not create a context for {self.path}: {exc}") from exc
        self._context = context
        self.kv_cache_tokens = context.n_ctx()

        vocab = model.vocab
        self._llama_cpp, self._vocab = llama_cpp, vocab
        eos_id, bos_id = model.token_eos(), model.token_bos()
        try:
            self.chat_template = model_template(
                self.params, self._metadata.get("tokenizer.chat_template"), None,
                bos_token=self._piece(bos_id, special=True).decode("utf-8", "replace") if bos_id >= 0 else "",
                eos_token=self._piece(eos_id, special=True).decode("utf-8", "replace") if eos_id >= 0 else "")
        except TemplateError as exc:
            context.close()
            model.close()
            raise EngineError(f"model {self.model_id}: {exc}") from exc
        self._add_bos = str(self._metadata.get("tokenizer.ggml.add_bos_token")).lower() == "true"
        self._pieces: dict[int, bytes] = {}
        disk = self._disk_store(llama_cpp, ctx_params, context.n_ctx())
        self._scheduler = BatchScheduler(
            llama_cpp, context.ctx, self._piece, vocab=vocab, n_vocab=model.n_vocab(), settings=s,
            host_cache_bytes=s.host_cache_mib * 2**20, name=self.model_id,
            tokenize=lambda text: model.tokenize(text.encode("utf-8"), add_bos=False, special=True), disk=disk,
        )
        self._scheduler.start()

    def _context_params(self, llama_cpp: Any, kv_tokens: int) -> Any:
        """The llama.cpp context's parameters: the engine settings, then the catalogue's overrides."""
        s = self.settings
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = kv_tokens
        ctx_params.n_batch = ctx_params.n_ubatch = s.batch_tokens
        ctx_params.n_seq_max = s.resident_sequences
        # Logits rows a step can ask for (batch.logits_rows). The default (n_batch rows) would size
        # the logits buffers for every token of a prompt chunk.
        ctx_params.n_outputs_max = logits_rows(s)
        ctx_params.n_threads = ctx_params.n_threads_batch = s.threads
        ctx_params.kv_unified = True  # sequences share one pool of cells, so seq_cp works across them
        ctx_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attention
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx_params.no_perf = True
        for key, value in self.params.get("llama", {}).get("context", {}).items():
            setattr(ctx_params, key, value)
        return ctx_params

    def _disk_store(self, llama_cpp: Any, ctx_params: Any, n_ctx: int) -> DiskKvStore | None:
        """Where conversations' KV state is kept across restarts, if a directory is set and writable."""
        s = self.settings
        if s.disk_cache_dir is None or s.disk_cache_mib <= 0:
            return None
        # What a saved state depends on: the weights, the llama.cpp build, the cache's shape and types.
        facts = {"llama_cpp": llama_cpp.__version__, "n_ctx": n_ctx, "type_k": ctx_params.type_k,
                 "type_v": ctx_params.type_v, "flash_attn": ctx_params.flash_attn_type,
                 "swa_full": ctx_params.swa_full, "kv_unified": ctx_params.kv_unified}
        try:
            return DiskKvStore(s.disk_cache_dir, s.disk_cache_mib * 2**20, fingerprint(self.path, **facts))
        except OSError as exc:  # an unwritable directory costs the restart's warm turns, not the model
            log.warning("conversations' KV state will not be kept on disk",
                        extra={"fields": {"dir": str(s.disk_cache_dir), "error": str(exc)}})
            return None

    def _close(self) -> None:
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.stop()
            self._scheduler = None
        if getattr(self, "_context", None) is not None:
            self._context.close()
            self._context = None
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None

    @classmethod
    def estimate_mib(cls, path: str, settings: EngineSettings) -> int:
        meta = gguf_metadata(path)
        kv = _kv_cells(path, meta, settings) * _kv_bytes_per_token(meta)
        # Conversations parked in host RAM are a separate reserve with its own bound
        # (settings.host_cache_mib, PARLEY_HOST_KV_CACHE_MIB), not counted here.
        return (os.path.getsize(path) + kv) // 2**20 + 32  # + compute buffers

    @property
    def running(self) -> int:
        return self._scheduler.running if getattr(self, "_scheduler", None) is not None else 0

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting if getattr(self, "_scheduler", None) is not None else 0

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kv_cache_tokens": self.kv_cache_tokens,
                "resident_sequences": self.settings.resident_sequences}

    def _submit(self, request: Request) -> None:
        self._scheduler.submit(request)

    def queue_place(self, request: Request) -> tuple[int, float] | None:
        scheduler = getattr(self, "_scheduler", None)
        return scheduler.queue_place(request) if scheduler is not None else None

    def line_moved(self) -> asyncio.Event | None:
        scheduler = getattr(self, "_scheduler", None)
        return scheduler.line_moved() if scheduler is not None else None

    # --- text <-> tokens -------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        # The rendered template spells out special tokens; parse them as such.
        return self._model.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)

    def _piece(self, token: int, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if n < 0:  # the piece is longer than the buffer
            buffer = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:max(n, 0)]

    def _detokenize(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        return piece

    def _is_end(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))


def _kv_bytes_per_token(meta: dict[str, Any]) -> int:
    arch = meta.get("general.architecture", "llama")
    layers = int(meta.get(f"{arch}.block_count", 32))
    heads = int(meta.get(f"{arch}.attention.head_count", 32))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    embd = int(meta.get(f"{arch}.embedding_length", 4096))
    return 2 * layers * kv_heads * (embd // max(1, heads)) * 2  # K and V, f16


def _kv_cells(path: str, meta: dict[str, Any], settings: EngineSettings) -> int:
    """The KV cache's size in tokens: as configured, or when chosen automatically at most twice the
    weights' memory (or 1 GiB); never less than the context window."""
    arch = meta.get("general.architecture", "llama")
    trained = int(meta.get(f"{arch}.context_length", 0) or 0)
    context = min(settings.context_length, trained) if trained > 0 else settings.context_length
    cells = settings.kv_cache_tokens
    if settings.kv_cache_auto:
        cells = min(cells, max(2 * os.path.getsize(path), 2**30) // _kv_bytes_per_token(meta))
    return max(cells, context)
