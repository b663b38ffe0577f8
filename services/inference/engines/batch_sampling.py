"""Sampling for the batch scheduler (engines.batch): each choice's llama.cpp sampler chain, a token
drawn from the choice's row of a step's logits (under a grammar, without masking the whole vocabulary
when a shortlist decides), the text a grammar dictates ("jump forward"), and logprobs.
"""

from __future__ import annotations

import collections
import ctypes
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.core.errors import InvalidArgument
from services.inference.engines.sequence import Request, TokenLogprob
from services.inference.models.grammars import Grammar

# Grammar sampling checks this many best tokens, then this many, before it masks the whole vocabulary.
SHORTLISTS = (256, 4096)
TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]  # llama_token_data


@dataclass
class Samplers:
    """One choice's llama.cpp samplers: `chain` picks the token; with a grammar, `pre` (logit bias and
    penalties, when asked for) runs before the grammar and `chain` after it. `shape` is `chain` without
    its final draw, made when speculation needs the distribution itself (engines.speculation)."""

    chain: Any
    pre: Any = None
    grammar: Any = None
    shape: Any = None

    def free(self, l: Any) -> None:
        for sampler in (self.chain, self.pre, self.grammar, self.shape):
            if sampler is not None:
                l.llama_sampler_free(sampler)
        self.chain = self.pre = self.grammar = self.shape = None


class ChoiceSampling:
    """The samplers of one llama.cpp context's choices; used on its decode thread only."""

    def __init__(self, llama_cpp: Any, ctx: Any, vocab: Any, n_vocab: int, piece: Callable[[int, bool], bytes],
                 tokenize: Callable[[str], list[int]] | None, stats: collections.Counter[str]) -> None:
        self._l = llama_cpp
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._piece = piece  # the engine's token -> bytes (special tokens spelled out when asked)
        self._tokenize = tokenize  # text -> tokens, no BOS (the text a grammar dictates); None: never jump
        self._jump_tokens: dict[str, list[int]] = {}
        self._sample_token = _holding_the_gil(llama_cpp)
        self.stats = stats  # the scheduler's: grammar shortlists and jumped tokens are counted here
        # Grammar sampling's llama_token_data arrays (numpy views of the C struct), made on first use.
        self._candidates: Any = None
        self._shortlists: list[Any] = []
        self._one: Any = None
        self._ids: Any = None

    def samplers(self, request: Request, index: int) -> Samplers:
        """The choice's samplers: logit bias and penalties, then greedy or top-k/top-p/min-p/temperature,
        all in one chain — or, with a grammar, bias and penalties in a chain of their own that runs
        before the grammar (see _sample_constrained)."""
        l, s = self._l, request.sampling
        made = Samplers(l.llama_sampler_chain_init(l.llama_sampler_chain_default_params()))
        try:
            if s.grammar is not None:
                made.grammar = self._grammar(s.grammar)
                if s.logit_bias or s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
                    made.pre = l.llama_sampler_chain_init(l.llama_sampler_chain_default_params())
            adjust = made.pre or made.chain
            if s.logit_bias:
                biases = (l.llama_logit_bias * len(s.logit_bias))(*(l.llama_logit_bias(t, b) for t, b in s.logit_bias))
                l.llama_sampler_chain_add(adjust, l.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases))
            if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
                penalties = l.llama_sampler_init_penalties(
                    self._n_vocab, 64, s.repetition_penalty, s.frequency_penalty, s.presence_penalty)
                for token in request.prompt[-64:]:  # into the penalties only: a grammar must not see the prompt
                    l.llama_sampler_accept(penalties, token)
                l.llama_sampler_chain_add(adjust, penalties)
        except Exception:
            made.free(l)
            raise
        chain = made.chain
        if s.temperature <= 0:
            l.llama_sampler_chain_add(chain, l.llama_sampler_init_greedy())
            return made
        if s.top_k > 0:
            l.llama_sampler_chain_add(chain, l.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            l.llama_sampler_chain_add(chain, l.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            l.llama_sampler_chain_add(chain, l.llama_sampler_init_min_p(s.min_p, 1))
        l.llama_sampler_chain_add(chain, l.llama_sampler_init_temp(s.temperature))
        seed = (s.seed + index) & 0xFFFFFFFF if s.seed is not None else random.getrandbits(32)
        l.llama_sampler_chain_add(chain, l.llama_sampler_init_dist(seed))
        return made

    def _grammar(self, grammar: Grammar) -> Any:
        """A GBNF grammar sampler; lazy (free until a trigger pattern matches) when it has triggers."""
        l = self._l
        if grammar.triggers:
            # llama.cpp matches each pattern against all the text so far; the grammar starts at group 1.
            patterns = (ctypes.c_char_p * len(grammar.triggers))(
                *(f"[\\s\\S]*?({re.escape(word)})[\\s\\S]*".encode() for word in grammar.triggers))
            sampler = l.llama_sampler_init_grammar_lazy_patterns(
                self._vocab, grammar.gbnf.encode(), b"root", patterns, len(grammar.triggers), None, 0)
        else:
            sampler = l.llama_sampler_init_grammar(self._vocab, grammar.gbnf.encode(), b"root")
        if not sampler:
            raise InvalidArgument("llama.cpp could not parse the grammar made from the schema")
        return sampler

    def pick(self, request: Request, made: Samplers, i: int) -> int:
        """A token for one choice from row i of the step's logits."""
        if made.grammar is None:
            return self._sample_token(made.chain, self._ctx, i)
        return self._sample_constrained(request, made, i)

    def _sample_constrained(self, request: Request, made: Samplers, i: int) -> int:
        """Samples row i under a grammar without masking the whole vocabulary (~15 ms a token with
        49k tokens) in the common cases, and with the same result as masking it:
        1. bias and penalties adjust every logit; the chain picks a token; if the grammar accepts
           that one token, it is the answer (llama.cpp's common sampler does this too);
        2. otherwise the grammar checks only the 256 best tokens, then the 4096 best (SHORTLISTS).
           When enough of them are valid (one for greedy, top_k when sampling), the best valid
           tokens of the whole vocabulary are all among them, and the chain picks from them;
        3. otherwise the grammar masks the whole vocabulary and the chain picks again."""
        import numpy as np

        l = self._l
        self._make_arrays()
        full, one, run = self._candidates, self._one, self._apply
        full["id"] = self._ids
        full["logit"] = np.ctypeslib.as_array(l.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))
        full["p"] = 0.0
        if made.pre is not None:
            run(full, made.pre)  # in place: neither bias nor penalties reorder or drop candidates
        adjusted = full["logit"].copy()
        token = run(full, made.chain)
        one[0] = (token, 0.0, 0.0)
        run(one, made.grammar)
        if not np.isfinite(one["logit"][0]):
            s = request.sampling
            need = 1 if s.temperature <= 0 else s.top_k  # top_k 0: the whole distribution counts
            for short in self._shortlists if need else ():
                best = np.argpartition(-adjusted, len(short) - 1)[: len(short)]
                short["id"], short["logit"], short["p"] = best, adjusted[best], 0.0
                run(short, made.grammar)
                if np.isfinite(short["logit"]).sum() >= need:
                    token = run(short, made.chain)
                    self.stats[f"grammar_shortlist_{len(short)}"] += 1
                    break
            else:
                full["id"], full["logit"], full["p"] = self._ids, adjusted, 0.0
                token = run(full, made.grammar, made.chain)
                self.stats["grammar_full"] += 1
        for sampler in (made.grammar, made.pre, made.chain):
            if sampler is not None:
                l.llama_sampler_accept(sampler, token)
        return token

    def distribution(self, made: Samplers, i: int) -> tuple[Any, Any]:
        """Row i's distribution as the choice's chain would draw from it (bias, top-k, top-p, min-p,
        temperature; no grammar): (token ids, probabilities). For a chain that ends in a draw."""
        import numpy as np

        l = self._l
        if made.shape is None:  # the chain's samplers but its last, the draw
            made.shape = l.llama_sampler_clone(made.chain)
            l.llama_sampler_free(l.llama_sampler_chain_remove(made.shape, l.llama_sampler_chain_n(made.shape) - 1))
        self._make_arrays()
        full = self._candidates
        full["id"] = self._ids
        full["logit"] = np.ctypeslib.as_array(l.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))
        full["p"] = 0.0
        array = l.llama_token_data_array(full.ctypes.data_as(ctypes.POINTER(l.llama_token_data)), len(full), -1, False)
        l.llama_sampler_apply(made.shape, ctypes.byref(array))
        kept = full[: array.size]
        logits = kept["logit"].astype(np.float64)
        weights = np.exp(logits - logits.max())
        return kept["id"].copy(), weights / weights.sum()

    def _make_arrays(self) -> None:
        """Grammar sampling's llama_token_data arrays, made on first use."""
        import numpy as np

        if self._candidates is None:
            self._candidates = np.zeros(self._n_vocab, dtype=TOKEN_DATA)
            self._shortlists = [np.zeros(size, dtype=TOKEN_DATA) for size in SHORTLISTS if size < self._n_vocab]
            self._one = np.zeros(1, dtype=TOKEN_DATA)
            self._ids = np.arange(self._n_vocab, dtype=np.int32)

    def _apply(self, candidates: Any, *samplers: Any) -> int:
        """Runs the samplers over the candidates in place; the token they selected, or -1."""
        l = self._l
        array = l.llama_token_data_array(candidates.ctypes.data_as(ctypes.POINTER(l.llama_token_data)),
                                         len(candidates), -1, False)
        for sampler in samplers:
            l.llama_sampler_apply(sampler, ctypes.byref(array))
        return int(candidates["id"][array.selected]) if array.selected >= 0 else -1

    def dictated(self, made: Samplers, text: str) -> list[int]:
        """`text`'s tokens if the grammar takes them one after another (then every sampler of the
        choice has accepted them, as if sampled); [] otherwise, and nothing changes."""
        if self._tokenize is None or not text:
            return []
        tokens = self._jump_tokens.get(text)
        if tokens is None:
            tokens = self._tokenize(text)
            if len(self._jump_tokens) < 1024:
                self._jump_tokens[text] = tokens
        l = self._l
        probe = l.llama_sampler_clone(made.grammar)
        self._make_arrays()
        one = self._one
        for token in tokens:
            one[0] = (token, 0.0, 0.0)
            self._apply(one, probe)
            if not one["logit"][0] > float("-inf"):  # the grammar would not take it: sample as usual
                l.llama_sampler_free(probe)
                return []
            l.llama_sampler_accept(probe, token)
        l.llama_sampler_free(made.grammar)
        made.grammar = probe
        for sampler in (made.pre, made.chain):
            if sampler is not None:
                for token in tokens:
                    l.llama_sampler_accept(sampler, token)
        self.stats["jumped"] += len(tokens)
        return list(tokens)

    def logprob(self, i: int, token: int, top: int) -> TokenLogprob:
        import numpy as np

        logits = np.ctypeslib.as_array(self._l.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))
        peak = float(logits.max())
        logsum = peak + float(np.log(np.exp(logits - peak).sum()))
        alternatives: tuple[tuple[str, bytes, float], ...] = ()
        if top:
            best = np.argpartition(-logits, top)[:top]
            best = best[np.argsort(-logits[best])]
            alternatives = tuple((self.text(int(t)), self._bytes(int(t)), float(logits[t]) - logsum) for t in best)
        return TokenLogprob(self.text(token), self._bytes(token), float(logits[token]) - logsum, alternatives)

    def _bytes(self, token: int) -> bytes:
        return self._piece(token, True)

    def text(self, token: int) -> str:
        return self._bytes(token).decode("utf-8", "replace")


def _holding_the_gil(llama_cpp: Any) -> Any:
    """llama_sampler_sample bound without releasing the GIL: it takes ~0.1 ms, and a thread that
    lets the GIL go waits to get it back while the event loop runs Python (one sample per running
    choice, every step)."""
    sample = ctypes.PyDLL(llama_cpp.llama_cpp._lib._name).llama_sampler_sample
    sample.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    sample.restype = ctypes.c_int32
    return sample
