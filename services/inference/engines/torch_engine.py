"""transformers causal LMs and encoder-decoders (BlenderBot, T5) on CUDA, MPS or CPU.

`source` is a Hugging Face model folder, or a .gguf file that transformers dequantizes (it needs the
`gguf` package). Nothing is downloaded: loading is local-only. On CUDA, 8-bit or 4-bit weights come
from bitsandbytes (PARLEY_QUANTIZATION). Each slot of a causal LM keeps its own KV cache (a
DynamicCache) and the tokens it holds; a new prompt only evaluates what differs from them. An
encoder-decoder encodes each prompt whole (its encoder reads the chat both ways: nothing carries
over) and its decoder writes the answer, sampled like a causal LM's.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.core.errors import InvalidArgument
from services.inference.chat_formats.conversation import default_format
from services.inference.engines.base import EngineError, Sampling, common_prefix
from services.inference.engines.slots import Slot, SlotEngine
from services.inference.engines.weights import safetensors_parameters
from services.inference.models.chat_template import TemplateError, model_template
from services.inference.models.grammars import Grammar
from services.inference.models.hardware import EngineSettings


BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2, "8bit": 1, "4bit": 0.5}


class TorchEngine(SlotEngine):
    engine_name = "torch"
    encoder_decoder = False  # set by _load

    def _load(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise EngineError(f"the torch engine needs torch and transformers (pip install -r requirements/torch.txt): {exc}") from exc
        self._torch = torch
        transformers.utils.logging.disable_progress_bar()  # JSON logs only
        model = self._load_model(transformers)
        self._model = model.eval()
        self._windows(model.config)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos = eos_ids
        self._pieces = Pieces(self._tokenizer)
        try:
            self.chat_template = model_template(
                self.params, self._tokenizer.chat_template, default_format(model.config),
                bos_token=self._tokenizer.bos_token or "", eos_token=self._tokenizer.eos_token or "")
        except TemplateError as exc:
            raise EngineError(f"model {self.model_id}: {exc}") from exc
        self.vocab_size = len(self._tokenizer)
        self._logits_size = int(model.config.vocab_size)  # the logits row: may be padded beyond the tokenizer
        self._grammar_compiler: Any = None  # built on first use: it indexes the vocabulary (~1 s)
        self._grammar_lock = threading.Lock()
        self._grammars: dict[str, Any] = {}
        self.slots = [Slot(index=i) for i in range(self.settings.parallel_slots)]

    def _load_model(self, transformers: Any) -> Any:
        """The tokenizer (self._tokenizer) and the model on its device: a causal LM, or an
        encoder-decoder (BlenderBot, T5) when its config says so; the same dtype, quantization and
        device either way."""
        torch = self._torch
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
            config = transformers.AutoConfig.from_pretrained(str(folder), **source)
            self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
            kind = transformers.AutoModelForSeq2SeqLM if self.encoder_decoder else transformers.AutoModelForCausalLM
            model = kind.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineError(f"transformers could not load {path}: {exc}") from exc
        if self.encoder_decoder:
            start = model.generation_config.decoder_start_token_id
            self._decoder_start = start if start is not None else model.config.decoder_start_token_id
            if self._decoder_start is None:
                raise EngineError(f"{path}: the encoder-decoder's config names no decoder_start_token_id")
        if not self.settings.quantization:
            model = model.to(device)
        self._device = device
        return model

    def _windows(self, config: Any) -> None:
        """The context window. An encoder-decoder has two: the encoder's (its positions, else the
        tokenizer's limit: T5's are relative) is the prompt's, and the answer has the decoder's."""
        trained = getattr(config, "max_position_embeddings", None)
        if self.encoder_decoder and not trained:
            limit = getattr(self._tokenizer, "model_max_length", 0) or 0
            trained = limit if 0 < limit < 1_000_000 else None  # transformers' "no limit" is ~1e30
        self.context_length = min(self.settings.context_length, int(trained or self.settings.context_length))
        self._decoder_window = min(self.settings.context_length, int(
            getattr(config, "max_position_embeddings", None) or self.settings.context_length))
        self.drops_oldest_turns = self.encoder_decoder

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
        return {**super().info(), "dtype": self.settings.dtype, "quantization": self.settings.quantization,
                "encoder_decoder": self.encoder_decoder}

    def answer_room(self, prompt_tokens: int) -> int:
        if not self.encoder_decoder:
            return super().answer_room(prompt_tokens)
        return self._decoder_window if prompt_tokens <= self.context_length else 0

    def prompt_room(self, max_tokens: int | None, reserve_tokens: int) -> int:
        return self.context_length if self.encoder_decoder else super().prompt_room(max_tokens, reserve_tokens)

    def check_sampling(self, sampling: Sampling) -> None:
        unsupported = [name for name, value in (("min_p", sampling.min_p), ("presence_penalty", sampling.presence_penalty),
                                                ("frequency_penalty", sampling.frequency_penalty),
                                                ("logit_bias", sampling.logit_bias)) if value]
        if unsupported:
            raise InvalidArgument(f"{', '.join(unsupported)}: not supported by the torch engine; use a llama.cpp model")
        if sampling.grammar is not None:
            if self.encoder_decoder:
                # Their vocabularies often cannot write JSON at all (T5's has no braces).
                raise InvalidArgument(f"response_format and tools: model {self.model_id!r} is an encoder-decoder, "
                                      "whose answers cannot be held to a schema; send plain text requests")
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
        return self._pieces(token)

    def _is_end(self, token: int) -> bool:
        return token in self._eos

    def _decode(self, slot: Slot, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        pick = TokenSampler(self, sampling)
        with self._torch.inference_mode():
            if self.encoder_decoder:
                yield from self._decode_answer(slot, prompt, pick)
            else:
                yield from self._continue(slot, prompt, pick)

    def _continue(self, slot: Slot, prompt: list[int], pick: TokenSampler) -> Iterator[int]:
        """A causal LM: the prompt evaluated after what the slot's cache holds of it, then the answer."""
        from transformers import DynamicCache

        cache = slot.state
        reuse = min(common_prefix(slot.tokens, prompt), len(prompt) - 1) if slot.tokens else 0
        if cache is not None and reuse > 0:
            held = cache.get_seq_length()
            if held > reuse:
                cache.crop(reuse - held)  # transformers 5: a negative count of tokens to drop
        else:
            cache, reuse = DynamicCache(), 0
        evaluated = list(prompt[:reuse])
        pending = prompt[reuse:]
        try:
            while True:
                ids = self._torch.tensor([pending], device=self._device)
                out = self._model(input_ids=ids, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                evaluated.extend(pending)
                token = pick(evaluated, out.logits[:, -1, :])
                yield token
                pending = [token]
        finally:
            slot.state, slot.tokens = cache, evaluated

    def _decode_answer(self, slot: Slot, prompt: list[int], pick: TokenSampler) -> Iterator[int]:
        """An encoder-decoder: the prompt encoded once, the answer decoded token by token from the
        decoder's start token (the repetition penalty looks at the answer, as transformers' does)."""
        torch = self._torch
        slot.state, slot.tokens = None, []  # nothing of an encoding carries over to another prompt
        encoded = self._model.get_encoder()(input_ids=torch.tensor([prompt], device=self._device))
        answer = [self._decoder_start]
        cache, pending = None, answer[:]
        while True:
            out = self._model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([pending], device=self._device),
                              past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = pick(answer, out.logits[:, -1, :])
            yield token
            answer.append(token)
            pending = [token]


class TokenSampler:
    """One request's way from logits to a token: its penalties and warpers (transformers' logits
    processors), its grammar's mask, and its random generator (seeded when asked)."""

    def __init__(self, engine: TorchEngine, sampling: Sampling) -> None:
        import torch
        from transformers import LogitsProcessorList
        from transformers.generation.logits_process import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self._torch, self._device, self._sampling = torch, engine._device, sampling
        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if sampling.temperature > 0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        self._processors = processors
        self._detokenize = engine._detokenize
        self._mask = GrammarMask(engine._compiled(sampling.grammar), sampling.grammar, engine._logits_size) \
            if sampling.grammar is not None else None
        self._generator = torch.Generator(device=self._device if self._device != "mps" else "cpu")
        self._generator.manual_seed(sampling.seed if sampling.seed is not None else random.getrandbits(32))

    def __call__(self, history: list[int], logits: Any) -> int:
        """The next token after `history` (what the penalties look at), from its logits row."""
        torch = self._torch
        scores = logits.float()
        if self._processors:
            scores = self._processors(torch.tensor([history], device=self._device), scores)
        if self._mask is not None:
            scores = self._mask.apply(scores)
        if self._sampling.temperature > 0:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs.cpu() if self._device == "mps" else probs, 1,
                                          generator=self._generator)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        if self._mask is not None:
            self._mask.accept(token, self._detokenize(token))
        return token


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


class Pieces:
    """A token's bytes as the answer streams them, one token at a time: what a whole decode would
    write at its place, for each way tokenizers mark words (GPT-2's byte-level pieces, SentencePiece's
    `▁` and byte fallback, BlenderBot-small's `@@` on a piece that a word goes on after)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._byte_decoder = _byte_decoder(tokenizer)
        vocab = tokenizer.get_vocab()
        self._joined_by_at = sum(piece.endswith("@@") for piece in vocab) > len(vocab) // 20

    def __call__(self, token: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if self._byte_decoder is not None and piece and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        if piece and piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        if piece and "▁" in piece:
            return piece.replace("▁", " ").encode()
        if piece and self._joined_by_at:  # a word ends where a piece has no "@@"; a space follows it
            return (piece[:-2] if piece.endswith("@@") else f"{piece} ").encode()
        return self._tokenizer.decode([token]).encode()


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
