"""What a restart costs a long conversation: TTFT of its next turn after the whole stack restarts, as
`make run` would (SIGTERM to every service, then a fresh start on the same data dir), against its
warm turns.

One conversation of --turns turns through /v1/chat/completions (streaming, greedy, the whole history
resent each turn, --answer-tokens per answer); warm TTFT is the median of its last five turns. Then:

  1. restart with the disk KV cache on (the default, <data dir>/kv): the next turn's TTFT;
  2. restart with PARLEY_DISK_KV_CACHE_MIB=0 (what every restart cost before): the turn after's TTFT.

Each is printed with its ratio to the warm turns (the goal for 1: <= 1.5x).

    make bench-restart
    .venv/bin/python bench/restart_bench.py [--turns 40] [--answer-tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_bench import MODEL, SYSTEM_PROMPT, api_key, bearer, first_delta, stack_environment  # noqa: E402
from services.stack import Stack  # noqa: E402

QUESTION = "Turn {}: name one thing a river carries, and say why in a few words."


def started(env: dict[str, str], logs: Path) -> Stack:
    stack = Stack(env=env, log_dir=logs)
    stack.start()
    stack.wait_healthy(timeout=300)
    return stack


def ask(http: httpx.Client, url: str, messages: list[dict[str, str]], k: int, answer_tokens: int) -> float:
    """One more turn of the conversation: its TTFT in ms; the answer joins `messages`."""
    messages.append({"role": "user", "content": QUESTION.format(k)})
    start = time.perf_counter()
    with http.stream("POST", f"{url}/v1/chat/completions",
                     json={"model": MODEL, "messages": messages, "stream": True, "max_tokens": answer_tokens,
                           "temperature": 0}) as response:
        response.raise_for_status()
        first, text = first_delta(response, lambda e: (e["choices"] or [{}])[0].get("delta", {}).get("content"))
    messages.append({"role": "assistant", "content": text})
    return (first - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description="Parley: a long conversation's next turn after a restart")
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--log-dir", default=None, help="keep the services' logs here")
    args = parser.parse_args()
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    with tempfile.TemporaryDirectory() as data:
        env = stack_environment(data)
        logs = Path(args.log_dir or Path(data) / "logs")
        stack = started(env, logs)
        try:
            key = api_key(stack)
            with httpx.Client(timeout=120, headers=bearer(key)) as http:
                warm = [ask(http, stack.url, messages, k + 1, args.answer_tokens) for k in range(args.turns)]
        finally:
            stack.stop()
        results = []
        for label, more in (("restart, disk KV cache on", {}), ("restart, disk KV cache off", {"PARLEY_DISK_KV_CACHE_MIB": "0"})):
            began = time.perf_counter()
            stack = started({**env, **more}, logs)
            start_s = time.perf_counter() - began
            try:
                with httpx.Client(timeout=120, headers=bearer(key)) as http:
                    results.append((label, ask(http, stack.url, messages, len(messages) // 2 + 1, args.answer_tokens),
                                    start_s))
            finally:
                stack.stop()
        kv = sorted((Path(data) / "kv").glob("*.kv"))
        kv_mib = sum(p.stat().st_size for p in kv) / 2**20
    base = statistics.median(warm[-5:])
    print(f"\nOne conversation of {args.turns} turns ({args.answer_tokens}-token answers, greedy, "
          f"/v1/chat/completions): TTFT in ms\n")
    print(f"{'turn':32} {'TTFT':>8} {'ratio':>7} {'stack start s':>14}")
    print(f"{'warm, last five (median)':32} {base:8.1f} {1.0:7.2f}")
    for label, ttft, start_s in results:
        print(f"{label:32} {ttft:8.1f} {ttft / base:7.2f} {start_s:14.1f}")
    print(f"\n(goal: disk on <= 1.5x; {len(kv)} state file(s), {kv_mib:.1f} MiB on disk at the end)", flush=True)


if __name__ == "__main__":
    main()
