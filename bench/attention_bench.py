"""What a long conversation's turn costs in llama.cpp's attention, with and without flash attention,
alone in the KV cache or beside other conversations kept warm (PARLEY_FLASH_ATTENTION's trade-off).

One llama.cpp context shaped as the engine makes it (unified KV cache, many sequences): a
conversation of --position tokens, then the median time of a --turn-token step (a new turn's
prefill) and of a one-token step (decoding), first with that conversation alone, then with --others
other sequences of --other-tokens tokens resident. Ratios are against flash attention alone.

    .venv/bin/python bench/attention_bench.py [--threads 2] [--position 1850] [--others 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp
from llama_cpp import _internals
from llama_cpp._logger import set_verbose

from services.inference.models.registry import BUNDLED, CatalogueEntry

BATCH = 512


def steps(model: object, flash: bool, threads: int, position: int, turn: int, others: int, other_tokens: int,
          cells: int, reps: int) -> tuple[float, float]:
    """Median ms of a `turn`-token step and of a one-token step at `position`."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = cells
    params.n_batch = params.n_ubatch = BATCH
    params.n_seq_max = others + 1
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True  # as the engine (services/inference/engines/llama.py)
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.no_perf = True
    context = _internals.LlamaContext(model=model, params=params, verbose=False)
    memory = llama_cpp.llama_get_memory(context.ctx)
    batch = llama_cpp.llama_batch_init(BATCH, 0, 1)

    def decode(seq: int, start: int, count: int) -> None:
        done = 0
        while done < count:
            n = min(BATCH, count - done)
            for i in range(n):
                batch.token[i] = 100 + (start + done + i) % 1000
                batch.pos[i] = start + done + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = i == n - 1
            batch.n_tokens = n
            if llama_cpp.llama_decode(context.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            done += n

    try:
        for seq in range(1, others + 1):
            decode(seq, 0, other_tokens)
        decode(0, 0, position)
        medians = []
        for count in (turn, 1):
            times = []
            for _ in range(reps):
                began = time.perf_counter()
                decode(0, position, count)
                times.append((time.perf_counter() - began) * 1000)
                llama_cpp.llama_memory_seq_rm(memory, 0, position, -1)
            medians.append(statistics.median(times))
        return medians[0], medians[1]
    finally:
        llama_cpp.llama_batch_free(batch)
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--position", type=int, default=1850, help="the conversation's length before the turn")
    parser.add_argument("--turn", type=int, default=24, help="tokens of the new turn's prefill")
    parser.add_argument("--others", type=int, default=12, help="other conversations kept warm")
    parser.add_argument("--other-tokens", type=int, default=800)
    parser.add_argument("--cells", type=int, default=16384, help="KV cache size in tokens")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    set_verbose(False)
    llama_cpp.llama_backend_init()
    model = _internals.LlamaModel(path_model=CatalogueEntry(**BUNDLED).path(),
                                  params=llama_cpp.llama_model_default_params(), verbose=False)
    print(f"{args.turn}-token turn and 1-token step at position {args.position}, {args.threads} threads; "
          f"ratio = time / (flash attention, alone)")
    print(f"{'attention':<18}{'resident':<22}{'turn ms':>9}{'ratio':>7}{'step ms':>9}{'ratio':>7}")
    base: tuple[float, float] | None = None
    try:
        for flash in (True, False):
            for others in (0, args.others):
                turn_ms, step_ms = steps(model, flash, args.threads, args.position, args.turn, others,
                                         args.other_tokens, args.cells, args.reps)
                base = base or (turn_ms, step_ms)
                resident = "alone" if not others else f"+{others} x {args.other_tokens} tokens"
                print(f"{'flash' if flash else 'no flash':<18}{resident:<22}{turn_ms:9.1f}{turn_ms / base[0]:7.2f}"
                      f"{step_ms:9.1f}{step_ms / base[1]:7.2f}", flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main()
