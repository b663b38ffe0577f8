"""llama.cpp through llama-cpp-python, for GGUF files.

Each slot is its own llama.cpp context over the same model file. The weights are mmap-ed, so the
operating system shares them between slots; each slot only adds its KV cache. llama-cpp-python
already reuses the longest common prefix between a context's previous tokens and a new prompt,
which is what makes the scheduler's prefix-affinity pay off.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence

from services.core.errors import InvalidArgument
from services.inference.engines.base import Engine, EngineError, Sampling, Slot

# The last-resort template when a GGUF carries none (ChatML).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class LlamaCppEngine(Engine):
    engine_name = "llama.cpp"

    def _load(self) -> None:
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:  # pragma: no cover - a broken install
            raise EngineError(f"llama-cpp-python is not installed: {exc}") from exc
        if not os.path.isfile(self.path):
            raise EngineError(f"model file not found: {self.path}")
        self._llama_cpp = llama_cpp
        first = None
        try:
            for index in range(self.settings.parallel_slots):
                llm = llama_cpp.Llama(
                    model_path=self.path,
                    n_ctx=self.settings.context_length,
                    n_batch=min(512, self.settings.context_length),
                    n_threads=self.settings.threads,
                    n_threads_batch=self.settings.threads,
                    n_gpu_layers=self.settings.gpu_layers,
                    verbose=False,
                    **self.params.get("llama", {}),
                )
                first = first or llm
                self.slots.append(Slot(index=index, state=llm))
        except (ValueError, RuntimeError) as exc:
            self._close()
            raise EngineError(f"llama.cpp could not load {self.path}: {exc}") from exc
        assert first is not None
        self.context_length = first.n_ctx()
        trained = int(first.metadata.get(f"{first.metadata.get('general.architecture', 'llama')}.context_length", 0) or 0)
        if trained and trained < self.context_length:
            self.context_length = trained
        self._first = first
        template = first.metadata.get("tokenizer.chat_template") or CHATML
        eos_id, bos_id = first.token_eos(), first.token_bos()
        tokens = {
            "eos_token": first.detokenize([eos_id], special=True).decode("utf-8", "replace") if eos_id >= 0 else "",
            "bos_token": first.detokenize([bos_id], special=True).decode("utf-8", "replace") if bos_id >= 0 else "",
        }
        self._formatters = {
            flag: Jinja2ChatFormatter(template=template, add_generation_prompt=flag, **tokens) for flag in (True, False)
        }
        self._eog = {eos_id}
        vocab = first._model.vocab if hasattr(first._model, "vocab") else None
        self._is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None) if vocab is not None else None
        self._vocab = vocab
        self._file_mib = os.path.getsize(self.path) // 2**20

    def _close(self) -> None:
        for slot in self.slots:
            slot.state.close()
        super()._close()

    def memory_mib(self) -> int:
        # Weights are shared through mmap; each slot adds its KV cache and compute buffers.
        if not self.slots:
            return 0
        state_mib = self._first.context_params.n_ctx * self._kv_bytes_per_token() // 2**20 + 16
        return self._file_mib + len(self.slots) * state_mib

    def _kv_bytes_per_token(self) -> int:
        meta = self._first.metadata
        arch = meta.get("general.architecture", "llama")
        layers = int(meta.get(f"{arch}.block_count", 32))
        heads = int(meta.get(f"{arch}.attention.head_count", 32))
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        embd = int(meta.get(f"{arch}.embedding_length", 4096))
        return 2 * layers * kv_heads * (embd // max(1, heads)) * 2  # K and V, f16

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._formatters[add_generation_prompt](messages=list(messages)).prompt
        except ValueError as exc:  # the template's raise_exception(): e.g. roles out of order
            raise InvalidArgument(f"the chat does not fit the model's chat template: {exc}") from exc

    def _tokenize(self, text: str) -> list[int]:
        # The rendered template spells out special tokens; parse them as such.
        return self._first.tokenize(text.encode("utf-8"), add_bos=self._add_bos(), special=True)

    def _add_bos(self) -> bool:
        flag = self._first.metadata.get("tokenizer.ggml.add_bos_token")
        return str(flag).lower() == "true"

    def _detokenize(self, token: int) -> bytes:
        return self._first.detokenize([token])

    def _is_end(self, token: int) -> bool:
        if token in self._eog:
            return True
        if self._is_eog is not None:
            return bool(self._is_eog(self._vocab, token))
        return False

    def _decode(self, slot: Slot, prompt: list[int], sampling: Sampling, threads: int) -> Iterator[int]:
        llm = slot.state
        self._llama_cpp.llama_set_n_threads(llm.ctx, threads, self.settings.threads)
        if not slot.tokens:
            llm.reset()
        llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(32))
        try:
            yield from llm.generate(
                prompt,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                min_p=0.0,
                temp=sampling.temperature,
                repeat_penalty=sampling.repetition_penalty,
            )
        finally:
            slot.tokens = list(llm.input_ids[: llm.n_tokens])

