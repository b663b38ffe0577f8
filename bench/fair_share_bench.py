"""Fair share under a flood (issue 32): user A opens many concurrent long streams, user B then sends
short chat turns one after another. Measured on the bundled model, through Envoy:

- B's TTFT p50 with the server idle (Parley, fair share on) — B's baseline;
- B's TTFT p50 under A's flood on Parley with fair share on, on Parley with fair share off (first
  come, first served: PARLEY_FAIR_SHARE=false) and on llama-server -np SLOTS (the peer, first come,
  first served with an unbounded queue);
- A's aggregate tokens/s during the flood, fair share on against off (fairness must not cost
  throughput).

It prints a table of ratios against the goals: B's TTFT under the flood <= 3x its idle TTFT, <= 0.25x
llama-server's under the same flood, and A's tokens/s >= 0.95x the first-come-first-served run's.
Each Parley run is a fresh stack (the setting is read at start-up) with SLOTS parallel slots and a
queue deep enough for the whole flood, so that both Parley runs serve all of A's streams. A's tokens/s
swing by 10% from one run to the next on a small machine, so each mode runs ROUNDS times, in
alternating order; the table takes the median round's tokens/s and pools B's TTFTs, and prints each
round's ratio.

    make bench-fair [LLAMA_SERVER=/path/to/llama-server]
    .venv/bin/python bench/fair_share_bench.py [--streams 48] [--tokens 128] [--turns 8] [--slots 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import inference_bench as ib  # beside this file: python puts the script's folder on sys.path
from services.stack import Stack

PASSWORD = "Fair-share-bench-passphrase-42"
END_OF_TURN = "2"  # the bundled model's <|im_end|>: biased away so that every flood answer is full length


@dataclass
class Flood:
    """One run of the pattern on one server."""

    ttfts: list[float] = field(default_factory=list)  # B's, seconds
    refused: int = 0  # B's turns answered 429
    a_tokens: int = 0
    a_seconds: float = 0.0
    a_refused: int = 0

    @property
    def a_rate(self) -> float:
        return self.a_tokens / self.a_seconds if self.a_seconds else 0.0


async def chat(http: httpx.AsyncClient, url: str, key: str, content: str, max_tokens: int,
               flood: bool = False) -> tuple[int, float | None, int]:
    """One streamed chat completion -> status, seconds to its first content, content pieces."""
    body = {"model": ib.MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0.8 if flood else 0}
    if flood:
        body["logit_bias"] = {END_OF_TURN: -100}
    sent, first, pieces = time.monotonic(), None, 0
    async with http.stream("POST", f"{url}/chat/completions", json=body, headers=ib.bearer(key)) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, None, 0
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if any(c.get("delta", {}).get("content") for c in json.loads(line[6:]).get("choices", [])):
                first = first if first is not None else time.monotonic() - sent
                pieces += 1
    return 200, first, pieces


def turn(i: int, phase: str) -> str:
    """B's i-th question, never asked before: an answer replayed from the response cache has no TTFT."""
    return f"Question {i} ({phase} {uuid.uuid4().hex[:8]}): name a colour and say why you like it."


async def idle_turns(url: str, key: str, turns: int, tokens: int) -> list[float]:
    async with httpx.AsyncClient(timeout=300) as http:
        await chat(http, url, key, "Say hi.", 4)  # warm: the model is loaded and the connection open
        ttfts = []
        for i in range(turns):
            _, first, _ = await chat(http, url, key, turn(i, "idle"), tokens)
            ttfts.append(first or 0.0)
        return ttfts


async def flood(url: str, a_key: str, b_key: str, args: argparse.Namespace) -> Flood:
    """A's streams at once; once they run, B's turns one after another until A's last stream ends
    (at least one turn)."""
    result = Flood()
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await chat(http, url, b_key, "Say hi.", 4)
        started = time.monotonic()
        streams = [asyncio.create_task(chat(http, url, a_key, ib.prompt(30_000 + i), args.tokens, flood=True))
                   for i in range(args.streams)]
        await asyncio.sleep(args.head_start)
        for i in range(args.turns):
            if i and all(s.done() for s in streams):
                break
            status, first, _ = await chat(http, url, b_key, turn(i, "flood"), args.turn_tokens)
            if status == 200 and first is not None:
                result.ttfts.append(first)
            else:
                result.refused += 1
        answers = await asyncio.gather(*streams)
        result.a_seconds = time.monotonic() - started
    result.a_tokens = sum(pieces for status, _, pieces in answers if status == 200)
    result.a_refused = sum(status != 200 for status, _, _ in answers)
    return result


def user_key(url: str, name: str) -> str:
    """A registered user's API key (each user its own share)."""
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/v1/auth/register", json={"username": name, "password": PASSWORD})
        answer.raise_for_status()
        token = answer.json()["tokens"]["access_token"]
        return http.post("/v1/api-keys", json={"name": "bench"}, headers=ib.bearer(token)).json()["secret"]


def on_parley(args: argparse.Namespace, fair: bool, log_dir: Path) -> tuple[Flood, list[float], int]:
    """The pattern on a fresh stack -> the flood, B's idle TTFTs (fair run only) and the engine's threads."""
    with tempfile.TemporaryDirectory() as data:
        env = ib.stack_environment(
            data, PARLEY_CONTEXT_LENGTH="2048", PARLEY_PARALLEL_SLOTS=str(args.slots),
            PARLEY_KV_CACHE_TOKENS="16384", PARLEY_QUEUE_DEPTH=str(args.streams + args.turns + 8),
            PARLEY_FAIR_SHARE="true" if fair else "false", PARLEY_ALLOW_REGISTRATION="true")
        stack = Stack(env=env, log_dir=log_dir / ("fair" if fair else "fifo"))
        stack.start()
        try:
            stack.wait_healthy(timeout=300)
            url = f"{stack.url}/v1"
            a_key, b_key = (user_key(stack.url, f"{who}-{uuid.uuid4().hex[:6]}") for who in ("flooder", "turns"))
            threads = int(ib.stack_hardware(stack, ib.api_key(stack))["threads"])
            idle = asyncio.run(idle_turns(url, b_key, args.turns, args.turn_tokens)) if fair else []
            return asyncio.run(flood(url, a_key, b_key, args)), idle, threads
        finally:
            stack.stop()


def on_llama_server(args: argparse.Namespace, binary: Path, threads: int, log_dir: Path) -> Flood:
    with ib.llama_server(binary, threads, log_dir / "llama-server.log", slots=args.slots) as server:
        return asyncio.run(flood(server.base_url, "no-key", "no-key", args))


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def report(args: argparse.Namespace, idle: list[float], runs: dict[str, Flood], threads: int,
           round_ratios: list[float]) -> None:
    fair, fifo, peer = runs["fair"], runs["fifo"], runs.get("llama-server")
    print(f"\nFair share under a flood — {ib.MODEL}, {threads} threads, {args.slots} slots, {args.rounds} rounds: "
          f"user A streams "
          f"{args.streams} x {args.tokens} tokens at once, user B sends up to {args.turns} turns of {args.turn_tokens} "
          f"tokens one after another\n")
    print(f"{'run':34} {'B TTFT p50 ms':>13} {'B refused':>9} {'A tok/s':>9} {'A refused':>9}")
    print(f"{'B alone (Parley, fair share)':34} {p50_ms(idle):13.1f} {0:9d} {'—':>9} {'—':>9}")
    labels = {"fair": "Parley, fair share", "fifo": "Parley, first come, first served",
              "llama-server": f"llama-server -np {args.slots}"}
    for name, run in runs.items():
        print(f"{labels[name]:34} {p50_ms(run.ttfts):13.1f} {run.refused:9d} {run.a_rate:9.1f} {run.a_refused:9d}")
    print(f"\n{'ratio':62} {'value':>7} goal")

    def ratio(name: str, value: float, goal: str) -> None:
        print(f"{name:62} {value:7.3f} {goal}")

    ratio("B TTFT under the flood / B TTFT idle (fair share)", p50_ms(fair.ttfts) / p50_ms(idle), "<= 3")
    if peer is not None:
        ratio(f"B TTFT under the flood: Parley / llama-server -np {args.slots}",
              p50_ms(fair.ttfts) / p50_ms(peer.ttfts), "<= 0.25")
    else:
        print(f"llama-server skipped: no binary (--llama-server PATH, $PARLEY_BENCH_LLAMA_SERVER or "
              f"{ib.DEFAULT_LLAMA_SERVER})")
    ratio("A tok/s: fair share / first come, first served", fair.a_rate / fifo.a_rate if fifo.a_rate else 0.0,
          ">= 0.95")
    if len(round_ratios) > 1:
        print(f"{'  each round (fair share, then first come, first served, in turn)':62} "
              + " ".join(f"{r:.3f}" for r in round_ratios))
    ratio("B TTFT under the flood: fair share / first come, first served", p50_ms(fair.ttfts) / p50_ms(fifo.ttfts),
          "(for the record)")


def main() -> None:
    parser = argparse.ArgumentParser(description="Parley fair-share benchmark")
    parser.add_argument("--streams", type=int, default=48, help="A's concurrent streams")
    parser.add_argument("--tokens", type=int, default=128, help="tokens of each of A's answers")
    parser.add_argument("--turns", type=int, default=8, help="B's turns (idle, and at most this many in the flood)")
    parser.add_argument("--turn-tokens", type=int, default=16, help="tokens of each of B's answers")
    parser.add_argument("--slots", type=int, default=16, help="PARLEY_PARALLEL_SLOTS and llama-server's -np")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Parley runs of each mode, in alternating order; A's tok/s is the median round's")
    parser.add_argument("--head-start", type=float, default=1.0, help="seconds A's flood runs before B's first turn")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help=f"the peer (default: $PARLEY_BENCH_LLAMA_SERVER, else {ib.DEFAULT_LLAMA_SERVER})")
    parser.add_argument("--log-dir", default=None, help="keep the services' and llama-server's logs here")
    args = parser.parse_args()
    binary = ib.find_llama_server(args.llama_server)
    with tempfile.TemporaryDirectory() as logs:
        log_dir = Path(args.log_dir or logs)
        rounds: list[dict[str, Flood]] = []
        idle: list[float] = []
        for i in range(args.rounds):
            # Alternate which mode goes first, so that a machine that slows down over the run does
            # not favour one of them.
            order = (True, False) if i % 2 == 0 else (False, True)
            runs: dict[str, Flood] = {}
            for fair in order:
                flood_run, idle_ttfts, threads = on_parley(args, fair, log_dir)
                runs["fair" if fair else "fifo"] = flood_run
                idle += idle_ttfts
            rounds.append(runs)
        merged = {name: merge([r[name] for r in rounds]) for name in ("fair", "fifo")}
        if binary is not None:
            merged["llama-server"] = on_llama_server(args, binary, threads, log_dir)
    report(args, idle, merged, threads, [r["fair"].a_rate / r["fifo"].a_rate for r in rounds if r["fifo"].a_rate])


def merge(runs: list[Flood]) -> Flood:
    """Rounds of one mode: B's TTFTs and refusals pooled; A's tokens/s the median round's."""
    middle = sorted(runs, key=lambda r: r.a_rate)[(len(runs) - 1) // 2]
    return Flood(ttfts=[t for r in runs for t in r.ttfts], refused=sum(r.refused for r in runs),
                 a_tokens=middle.a_tokens, a_seconds=middle.a_seconds, a_refused=sum(r.a_refused for r in runs))


if __name__ == "__main__":
    main()
