"""Parley's patches to llama.cpp (patches/llama.cpp/): the installed build carries them; the flash
attention path for short steps computes what flash attention computes without it, the same whatever
rows share a step; the Q4_1 tiles (AVX-512 and AVX2 kernels) compute every logit bit for bit as
llama.cpp's own dot product.

Each check runs one step in a child process, because llama.cpp reads GGML_FA_RUNS and
GGML_Q4_1_TILES once per process: a conversation of real text, two more sequences (one sharing its
prefix), then one step that mixes a 20-token turn of the first (a run, the patched attention path)
with one decoding token of each other (lone rows, llama.cpp's own row-by-row path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.inference.engines.llama import llama_cpp_patches

STEP = r'''
import sys, numpy as np, llama_cpp
from llama_cpp import _internals
from llama_cpp._logger import set_verbose
from services.inference.models.registry import BUNDLED, CatalogueEntry

set_verbose(False)
llama_cpp.llama_backend_init()
model = _internals.LlamaModel(path_model=CatalogueEntry(**BUNDLED).path(),
                              params=llama_cpp.llama_model_default_params(), verbose=False)
p = llama_cpp.llama_context_default_params()
p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.n_threads, p.n_threads_batch = 4096, 256, 256, 3, 2, 2
p.kv_unified = True
p.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if sys.argv[2] == "on"
                     else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
ctx = _internals.LlamaContext(model=model, params=p, verbose=False)
memory = llama_cpp.llama_get_memory(ctx.ctx)
batch = llama_cpp.llama_batch_init(256, 0, 1)
n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model.model))
text = ("The lighthouse keeper climbed the spiral stairs every evening, counting each of the one hundred "
        "and twelve steps, and lit the lamp that warned the fishing boats away from the rocks. ") * 12
tokens = model.tokenize(text.encode(), add_bos=True, special=False)[:128]  # one step of 128: llama.cpp's tiled path
turn = model.tokenize(b" When the storm came in the night, he kept the light burning until dawn, and the boats came "
                      b"home one by one through the rain.", add_bos=False, special=False)[:20]
assert len(turn) == 20

def step(rows):
    for i, (seq, pos, token, logits) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq
    batch.n_tokens = len(rows)
    assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
    return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, i), shape=(n_vocab,)).copy()
            for i, row in enumerate(rows) if row[3]]

for start in range(0, len(tokens), 128):
    step([(0, start + i, t, False) for i, t in enumerate(tokens[start:start + 128])])
llama_cpp.llama_memory_seq_cp(memory, 0, 1, -1, -1)  # sequence 1 shares the whole prefix
step([(2, i, t, False) for i, t in enumerate(tokens[:64])])  # sequence 2: a history of its own
# fewer than 256 cells in use: a one-token step takes llama.cpp's row-by-row path, not its split one
n = len(tokens)
rows = [(0, n + j, t, True) for j, t in enumerate(turn)] + [(1, n, tokens[5], True), (2, 64, tokens[65], True)]
out = step(rows)
# the turn's last token again, alone, over the same cells: what a cached prompt's next request does
llama_cpp.llama_memory_seq_rm(memory, 0, n + len(turn) - 1, -1)
out += step([(0, n + len(turn) - 1, turn[-1], True)])
# a step of 64 rows that mixes two sequences: a 40-token turn of sequence 1 and 24 more prompt tokens
# of sequence 2; with more than 256 cells in use, its last row sees fewer than the cache's cells
# by 256 or more: the runs path takes it, not llama.cpp's tiled one
out += step([(1, n + 1 + j, t, True) for j, t in enumerate(tokens[10:50])]
            + [(2, 65 + j, t, True) for j, t in enumerate(tokens[70:94])])
# one-token steps with 512 cells or more (llama.cpp's split path, which Parley's patch gives each
# thread's visible cells once for all heads): a 320-token history of sequence 0 in steps of 256 and
# 64 rows (alone in the cache: the tiled path, patched or not), then sequence 1 token by token
for s_ in range(3):
    llama_cpp.llama_memory_seq_rm(memory, s_, -1, -1)
history = (tokens * 3)[:320]
step([(0, i, t, False) for i, t in enumerate(history[:256])])
step([(0, 256 + i, t, False) for i, t in enumerate(history[256:])])
for i, t in enumerate(turn[:8]):
    out += step([(1, i, t, True)])
out += step([(0, 320, turn[0], True)])
np.save(sys.argv[1], np.array(out))
'''


def logits(tmp_path: Path, flash: str, runs: str, tiles: str = "1") -> np.ndarray:
    out = tmp_path / f"{flash}-{runs}-{tiles}.npy"
    env = {**os.environ, "GGML_FA_RUNS": runs, "GGML_Q4_1_TILES": tiles}
    subprocess.run([sys.executable, "-c", STEP, str(out), flash], env=env, check=True, timeout=300,
                   capture_output=True)
    return np.load(out)


def test_the_installed_llama_cpp_carries_parleys_patches() -> None:
    patches = llama_cpp_patches()
    assert set(patches) == {"fa_runs", "q4_1_tiles"}, "llama-cpp-python was not built by tools/patched_llama_cpp.py"
    assert patches["fa_runs"]
    flags = set(Path("/proc/cpuinfo").read_text().split())
    avx2, avx512 = {"avx2", "f16c", "fma"} <= flags, {"avx512f", "avx512bw", "avx512vl"} <= flags
    assert patches["q4_1_tiles"] == (512 if avx2 and avx512 else 256 if avx2 else 0)  # built for this CPU (GGML_NATIVE)


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    tmp = tmp_path_factory.mktemp("attention")
    return {"patched": logits(tmp, "on", "1"), "stock": logits(tmp, "on", "0"), "exact": logits(tmp, "off", "1"),
            "untiled": logits(tmp, "on", "1", tiles="0"), "avx2": logits(tmp, "on", "1", tiles="256")}


def test_q4_1_tiles_compute_every_logit_as_llama_cpps_dot_product(steps: dict[str, np.ndarray]) -> None:
    """The bundled model's weights are Q4_1: the 20-token turn, both lone rows and the 128-token
    prefill before them went through the tiles, or through ggml_vec_dot_q4_1_q8_1 with them off;
    GGML_Q4_1_TILES=256 takes the AVX2 kernel (what builds for CPUs without AVX-512 run)."""
    if not llama_cpp_patches().get("q4_1_tiles"):
        pytest.skip("the Q4_1 tiles are compiled for x86 with AVX2 (and AVX-512) only")
    assert np.array_equal(steps["patched"], steps["untiled"])
    assert np.array_equal(steps["avx2"], steps["untiled"])


def test_lone_decoding_rows_are_computed_as_before(steps: dict[str, np.ndarray]) -> None:
    assert np.array_equal(steps["patched"][20:22], steps["stock"][20:22])


def test_a_turns_last_token_gives_the_same_logits_evaluated_again_alone(steps: dict[str, np.ndarray]) -> None:
    """A cached prompt's next request evaluates only its last token: a seeded answer repeats."""
    assert np.array_equal(steps["patched"][19], steps["patched"][22])


BIG = slice(23, 87)  # the 64-row step: sequence 1's turn (23-62), sequence 2's tokens (63-86)


def test_a_step_of_64_rows_mixing_sequences_takes_the_runs_as_close_to_attention_without_flash(
        steps: dict[str, np.ndarray]) -> None:
    """llama.cpp's tiled path would compute every cell for every row and head; the runs see their own."""
    patched, stock, exact = steps["patched"][BIG], steps["stock"][BIG], steps["exact"][BIG]
    assert not np.array_equal(patched, stock)  # the runs path ran
    ours, theirs = np.abs(patched - exact).max(axis=1), np.abs(stock - exact).max(axis=1)
    assert ours.max() <= max(2 * theirs.max(), 0.05), (ours, theirs)
    assert np.mean(ours) <= 1.5 * np.mean(theirs) + 0.01, (ours, theirs)


def test_one_token_steps_beside_many_cells_are_computed_as_before(steps: dict[str, np.ndarray]) -> None:
    """The split path visits only the cells a row sees, listed once per thread: the same bits."""
    assert len(steps["patched"]) == 96
    assert np.array_equal(steps["patched"][87:96], steps["stock"][87:96])


def test_a_turns_rows_are_as_close_to_attention_without_flash_as_stock_flash_attention(
        steps: dict[str, np.ndarray]) -> None:
    turn = slice(0, 20)
    patched = np.abs(steps["patched"][turn] - steps["exact"][turn]).max(axis=1)
    stock = np.abs(steps["stock"][turn] - steps["exact"][turn]).max(axis=1)
    assert not np.array_equal(steps["patched"][turn], steps["stock"][turn])  # the patched path ran
    assert patched.max() <= max(2 * stock.max(), 0.05), (patched, stock)
    assert np.mean(patched) <= 1.5 * np.mean(stock) + 0.01, (patched, stock)
    agree = (steps["patched"][turn].argmax(axis=1) == steps["exact"][turn].argmax(axis=1)).mean()
    assert agree >= (steps["stock"][turn].argmax(axis=1) == steps["exact"][turn].argmax(axis=1)).mean() - 0.1
