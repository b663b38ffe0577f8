"""transformers causal LMs on CUDA, MPS or CPU.

`source` is a Hugging Face model folder, or a .gguf file that transformers dequantizes (it needs the
`gguf` package). Nothing is downloaded: loading is local-only. On CUDA, 8-bit or 4-bit weights come
from bitsandbytes (PARLEY_QUANTIZATION). Each slot keeps its own KV cache (a DynamicCache) and the
tokens it holds; a new prompt only evaluates what differs from them.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from services.core.errors import InvalidArgument
from services.inference.engines.base import EngineError, Sampling, common_prefix
from services.inference.engines.slots import Slot, SlotEngine
from services.inference.engines.weights import safetensors_parameters
from services.inference.hardware import EngineSettings
from services.inference.chat_template import ChatTemplate, TemplateError, template_source
from services.inference.structured import Grammar


BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2, "8bit": 1, "4bit": 0.5}


class TorchEngine(SlotEngine):
    engine_name = "torch"

    def _load(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise EngineError(f"the torch engine needs torch and transformers (pip install -r requirements/torch.txt): {exc}") from exc
        self._torch = torch
        transformers.utils.logging.disable_progress_bar()  # JSON logs only
        path = Path(self.path)
        if not path.exists():
            raise EngineError(f"model not found: {path}")
        source: dict[str, Any] = {"local_files_only": True}
        folder = path
        if path.is_file():
            if path.suffix != ".gguf":
                raise EngineError(f"{path}: the torch engine loads a model folder or a .gguf file")
            folder, source["gguf_file"] = path.parent, path.name
        device = self.settings.device
        dtype = getattr(torch, self.settings.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype, **source, **self.params.get("torch", {})}
        if self.settings.quantization:
            if not device.startswith("cuda"):
                raise EngineError("8-bit/4-bit quantization needs CUDA (bitsandbytes)")
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_8bit=self.settings.quantization == "8bit",
                load_in_4bit=self.settings.quantization == "4bit",
                bnb_4bit_compute_dtype=dtype,
            )
            kwargs["device_map"] = device
        if device == "cpu":
            torch.set_num_threads(self.settings.threads)
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **source)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineError(f"transformers could not load {path}: {exc}") from exc
        if not self.settings.quantization:
            model = model.to(device)
        self._model = model.eval()
        self._device = device
        trained = getattr(model.config, "max_position_embeddings", None) or self.settings.context_length
        self.context_length = min(self.settings.context_length, int(trained))
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos = eos_ids
        self._byte_decoder = _byte_decoder(self._tokenizer)
        try:
            source_template = template_source(self.params) or self._tokenizer.chat_template
            if source_template:
                self.chat_template = ChatTemplate(source_template, bos_token=self._tokenizer.bos_token or "",
                                                  eos_token=self._tokenizer.eos_token or "")
        except TemplateError as exc:
            raise EngineError(f"model {self.model_id}: {exc}") from exc
        self.vocab_size = len(self._tokenizer)
        self._logits_size = int(model.config.vocab_size)  # the logits row: may be padded beyond the tokenizer
        self._grammar_compiler: Any = None  # built on first use: it indexes the vocabulary (~1 s)
        self._grammar_lock = threading.Lock()
        self._grammars: dict[str, Any] = {}
        self.slots = [Slot(index=i) for i in range(self.settings.parallel_slots)]

    def _close(self) -> None:
        self._model = None
        super()._close()
        if getattr(self, "_torch", None) is not None and self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    @classmethod
    def estimate_mib(cls, path: str, settings: EngineSettings) -> int:
        """The parameters (counted from the safetensors headers; a GGUF file's size otherwise) at the
        dtype or quantization they load in, and 64 MiB of KV cache per slot."""
        source = Path(path)
        parameters = safetensors_parameters(source if source.is_dir() else source.parent)
        if parameters:
            weights = parameters * BYTES_PER_PARAMETER.get(settings.quantization or settings.dtype, 4)
        else:
            weights = source.stat().st_size if source.is_file() else 0
        return int(weights) // 2**20 + 64 * settings.parallel_slots

    def info(self) -> dict[str, Any]:
        return {**super().info(), "dtype": self.settings.dtype, "quantization": self.settings.quantization}

    def check_sampling(self, sampling: Sampling) -> None:
        unsupported = [name for name, value in (("min_p", sampling.min_p), ("presence_penalty", sampling.presence_penalty),
                                                ("frequency_penalty", sampling.frequency_penalty),
                                                ("logit_bias", sampling.logit_bias)) if value]
        if unsupported:
            raise InvalidArgument(f"{', '.join(unsupported)}: not supported by the torch engine; use a llama.cpp model")
        if sampling.grammar is not None:
            self._compiled(sampling.grammar)  # a grammar xgrammar cannot take is a 400 before anything runs
        super().check_sampling(sampling)

    def _compiled(self, grammar: Grammar) -> Any:
        """The grammar compiled against this tokenizer (xgrammar), cached by its text."""
        compiled = self._grammars.get(grammar.gbnf)
        if compiled is not None:
            return compiled
        try:
            import xgrammar
        except ImportError as exc:
            raise InvalidArgument(f"response_format and tools need xgrammar with the torch engine: {exc}") from None
        with self._grammar_lock:
            if self._grammar_compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._logits_size, stop_token_ids=sorted(self._eos))
                self._grammar_compiler = xgrammar.GrammarCompiler(info)
            try:
                compiled = self._grammar_compiler.compile_grammar(grammar.gbnf, root_rule_name="root")
            except RuntimeError as exc:
                raise InvalidArgument(f"the grammar made from the schema does not compile: {exc}") from None
        if len(self._grammars) >= 64:
            self._grammars.pop(next(iter(self._grammars)))
        self._grammars[grammar.gbnf] = compiled
        return compiled

    def _tokenize(self, text: str) -> list[int]:
        # The chat template already wrote any BOS it wants.
        return list(self._tokenizer(text, add_special_tokens=False).input_ids)

    def _detokenize(self, token: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if self._byte_decoder is not None and piece and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        if piece and piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        if piece and "▁" in piece:
            return piece.replace("▁", " ").encode()
        return self._tokenizer.decode([token]).encode()

    def _is_end(self, token: int) -> bool:
        return token in self._eos

    def _decode(self, slot: Slot, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        torch = self._torch
        from transformers import DynamicCache, LogitsProcessorList
        from transformers.generation.logits_process import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        cache = slot.state
        reuse = min(common_prefix(slot.tokens, prompt), len(prompt) - 1) if slot.tokens else 0
        if cache is not None and reuse > 0:
            held = cache.get_seq_length()
            if held > reuse:
                cache.crop(reuse - held)  # transformers 5: a negative count of tokens to drop
        else:
            cache, reuse = DynamicCache(), 0
        evaluated = list(prompt[:reuse])
        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if sampling.temperature > 0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        mask = GrammarMask(self._compiled(sampling.grammar), sampling.grammar, self._logits_size) \
            if sampling.grammar is not None else None
        generator = torch.Generator(device=self._device if self._device != "mps" else "cpu")
        generator.manual_seed(sampling.seed if sampling.seed is not None else random.getrandbits(32))
        pending = prompt[reuse:]
        try:
            with torch.inference_mode():
                while True:
                    ids = torch.tensor([pending], device=self._device)
                    out = self._model(input_ids=ids, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    evaluated.extend(pending)
                    history = torch.tensor([evaluated], device=self._device)
                    scores = processors(history, out.logits[:, -1, :].float())
                    if mask is not None:
                        scores = mask.apply(scores)
                    if sampling.temperature > 0:
                        probs = torch.softmax(scores, dim=-1)
                        token = int(torch.multinomial(probs.cpu() if self._device == "mps" else probs, 1,
                                                      generator=generator)[0, 0])
                    else:
                        token = int(torch.argmax(scores, dim=-1)[0])
                    if mask is not None:
                        mask.accept(token, self._detokenize(token))
                    yield token
                    pending = [token]
        finally:
            slot.state, slot.tokens = cache, evaluated


class GrammarMask:
    """A grammar over one choice's logits (xgrammar): tokens the grammar forbids get -inf. A lazy
    grammar waits for its trigger word in the text so far and then starts at it."""

    def __init__(self, compiled: Any, grammar: Grammar, logits_size: int) -> None:
        import xgrammar

        self._xgrammar = xgrammar
        self._compiled = compiled
        self._triggers = [word.encode() for word in grammar.triggers]
        self._matcher = None if self._triggers else xgrammar.GrammarMatcher(compiled)
        self._text = b""
        self._bitmask = xgrammar.allocate_token_bitmask(1, logits_size)
        self._size = logits_size

    def apply(self, scores: Any) -> Any:
        if self._matcher is None:
            return scores
        import torch

        self._matcher.fill_next_token_bitmask(self._bitmask)
        words = self._bitmask[0].to(scores.device)
        shifts = torch.arange(32, device=scores.device, dtype=words.dtype)
        allowed = ((words.unsqueeze(1) >> shifts) & 1).bool().flatten()[: scores.shape[-1]]
        return scores.masked_fill(~allowed, float("-inf"))

    def accept(self, token: int, piece: bytes) -> None:
        if self._matcher is not None:
            self._matcher.accept_token(token)
            return
        self._text += piece
        found = [at for at in (self._text.find(word) for word in self._triggers) if at != -1]
        if found:
            self._matcher = self._xgrammar.GrammarMatcher(self._compiled)
            self._matcher.accept_string(self._text[min(found):].decode("utf-8", "replace"))


def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2 style byte-level BPE maps bytes to printable characters; this is the inverse map."""
    vocab = tokenizer.get_vocab()
    if not any(piece.startswith("Ġ") for piece in vocab):
        return None
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}
