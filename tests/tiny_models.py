"""Tiny conversational models, made on the spot: one of each architecture the torch engine serves
without a chat template (GPT-2 as DialoGPT, Bloom, BlenderBot-small, T5), two layers of width 32,
randomly initialised, and a byte-level BPE tokenizer trained on a few sentences. Nothing is
downloaded.

`make(..., taught=True)` then teaches the model one exchange written out in its architecture's own
conversation format (EXCHANGES: "hi" answered "hello there"), a few hundred steps on the CPU, so that
a test can tell a prompt rendered as the model was trained (it answers "hello there", and stops where
the format says the answer ends) from one that is not (noise)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "hello there how are you today",
    "i am fine thank you and you",
    "what is the weather like in paris",
    "it is sunny and warm with a light breeze",
    "tell me a story about a cat",
    "the cat sat on the mat and slept",
    "User: hi Assistant: hello",
]
ARCHITECTURES = ("gpt2", "bloom", "blenderbot-small", "t5")
# Each architecture's special tokens, first in the vocabulary (ids 0, 1, 2…), as its real tokenizer names them.
SPECIALS = {
    "gpt2": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "bloom": {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "blenderbot-small": {"pad_token": "__null__", "bos_token": "__start__", "eos_token": "__end__", "unk_token": "__unk__"},
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}
WIDTH = {"hidden_size": 32, "num_attention_heads": 2}


def tokenizer(kind: str):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(SPECIALS[kind].values()))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIALS[kind])


def config(kind: str, vocab_size: int, ids: dict[str, int]):  # -> transformers.PretrainedConfig
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"])
    if kind == "bloom":
        return transformers.BloomConfig(vocab_size=vocab_size, n_layer=2, n_head=2, hidden_size=32,
                                        pad_token_id=ids["pad_token"], bos_token_id=ids["bos_token"],
                                        eos_token_id=ids["eos_token"])
    if kind == "blenderbot-small":
        return transformers.BlenderbotSmallConfig(
            vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=ids["pad_token"], bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
            decoder_start_token_id=ids["bos_token"], forced_eos_token_id=None)
    if kind == "t5":
        return transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                     num_heads=2, pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"],
                                     decoder_start_token_id=ids["pad_token"])
    raise ValueError(kind)


# The exchange each is taught, written out by hand in its format: (what the model reads, what it
# writes). A causal model reads and writes one text; an encoder-decoder's decoder writes the answer.
EXCHANGES = {
    "gpt2": ("hi<|endoftext|>", "hello there<|endoftext|>"),  # dialogpt
    "bloom": ("User: hi\nAssistant:", " hello there\nUser: and you?"),  # transcript: the stop cuts at "\nUser:"
    "blenderbot-small": (" hi__end__", "hello there__end__"),  # blenderbot
    "t5": ("hi</s>", "hello there</s>"),  # t5: one question as it is
}
ANSWER = "hello there"


def teach(kind: str, model, tok, steps: int = 300) -> None:
    """Trains `model` on its EXCHANGES entry until it answers it (greedy)."""
    import torch

    source, answer = EXCHANGES[kind]
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    if model.config.is_encoder_decoder:
        batch = {"input_ids": torch.tensor([tok(source, add_special_tokens=False).input_ids]),
                 "labels": torch.tensor([tok(answer, add_special_tokens=False).input_ids])}
    else:
        ids = torch.tensor([tok(source + answer, add_special_tokens=False).input_ids])
        batch = {"input_ids": ids, "labels": ids}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains ~50x faster on one thread than on busy cores
    try:
        for _ in range(steps):
            optimiser.zero_grad()
            loss = model(**batch).loss
            if loss.item() < 0.02:  # learnt: greedy decoding gives it back
                break
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def make(kind: str, folder: Path, seed: int = 0, taught: bool = False) -> Path:
    """A tiny `kind` model (one of ARCHITECTURES) saved in `folder`, as a catalogue's source;
    `taught`: it has learnt its EXCHANGES entry."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tok = tokenizer(kind)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in SPECIALS[kind].items()}
    settings = config(kind, len(tok), ids)
    kind_of_model = transformers.AutoModelForSeq2SeqLM if settings.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = kind_of_model.from_config(settings)
    if taught:
        teach(kind, model, tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
