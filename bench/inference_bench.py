"""Decode speed and time to first token on the bundled model, along three paths, in one run:

  (a) llama-cpp-python called directly in this process (the baseline)
  (b) the inference service's gRPC Generate stream
  (c) Envoy's REST path, /v1/chat/completions with stream=true (SSE)
  (d) a saved conversation's turn, POST /v1/sessions/{id}:chat (SSE): session stores both messages,
      counts the history's tokens and asks the cache before inference generates

plus aggregate throughput for 1, 4 and 8 concurrent streams through Envoy, and the time to the
answer of a deterministic turn served from the response cache. Every figure is printed
as a ratio against (a). Every request gets a distinct prompt, so no path is helped by a fully cached
prompt; all paths may reuse the shared chat-template prefix, as llama-cpp-python itself does.

    make bench            # or: .venv/bin/python bench/inference_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import httpx
from llama_cpp import Llama
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc

from services.inference.registry import BUNDLED, CatalogueEntry
from services.stack import Stack, free_port

ADMIN_PASSWORD = f"Bench-{uuid.uuid4().hex}"

MODEL = BUNDLED["id"]
MAX_TOKENS = 96


def prompt(i: int) -> str:
    return f"Story number {i}: write a long, detailed story about a dragon who learns to sail."


def rates(stamps: list[float], start: float) -> tuple[float, float]:
    """(decode tokens/s after the first token, time to first token in ms)."""
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return decode, (stamps[0] - start) * 1000


def bench_direct(runs: int, threads: int, context: int) -> tuple[float, float]:
    llm = Llama(model_path=CatalogueEntry(**BUNDLED).path(), n_ctx=context, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    results = []
    for i in range(runs + 1):
        start = time.perf_counter()
        stamps = []
        stream = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt(i)}], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        )
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
        if i:  # the first run warms up
            results.append(rates(stamps, start))
    llm.close()
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def bench_grpc(target: str, runs: int, token: str) -> tuple[float, float]:
    results = []
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for i in range(runs + 1):
            request = pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content=prompt(100 + i))],
                                         sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
            start = time.perf_counter()
            stamps = [time.perf_counter() for reply in stub.Generate(request, metadata=(("authorization", f"Bearer {token}"),))
                      if reply.text]
            if i:
                results.append(rates(stamps, start))
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def _sse_body(i: int, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}


def bench_rest(url: str, runs: int, token: str) -> tuple[float, float]:
    results = []
    with httpx.Client(timeout=120, headers=bearer(token)) as http:
        for i in range(runs + 1):
            start = time.perf_counter()
            stamps = []
            with http.stream("POST", f"{url}/v1/chat/completions", json=_sse_body(200 + i)) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        stamps.append(time.perf_counter())
            if i:
                results.append(rates(stamps, start))
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def session_turn(http: httpx.Client, url: str, i: int) -> list[float]:
    """Token arrival times of one deterministic turn in a new session."""
    sid = http.post(f"{url}/v1/sessions", json={}).json()["id"]
    stamps = []
    body = {"content": prompt(i), "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0}}
    with http.stream("POST", f"{url}/v1/sessions/{sid}:chat", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and "delta" in (event := json.loads(line[6:])):
                # A cached answer arrives as one delta; count its tokens at that instant.
                stamps.append(time.perf_counter())
    return stamps


def bench_session(url: str, runs: int, token: str) -> tuple[tuple[float, float], float]:
    """((decode tok/s, TTFT ms) of generated turns, median ms to a cached answer of the same turns)."""
    generated, cached = [], []
    with httpx.Client(timeout=120, headers=bearer(token)) as http:
        for i in range(runs + 1):
            start = time.perf_counter()
            stamps = session_turn(http, url, 300 + i)
            if i:
                generated.append(rates(stamps, start))
        for i in range(1, runs + 1):
            start = time.perf_counter()
            stamps = session_turn(http, url, 300 + i)
            cached.append((stamps[-1] - start) * 1000)
    return (statistics.median(r[0] for r in generated), statistics.median(r[1] for r in generated)), statistics.median(cached)


async def bench_concurrent(url: str, streams: int, token: str, max_tokens: int = 64) -> float:
    async def one(http: httpx.AsyncClient, i: int) -> int:
        tokens = 0
        async with http.stream("POST", f"{url}/v1/chat/completions", json=_sse_body(1000 + i, max_tokens)) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    tokens += 1
        return tokens

    async with httpx.AsyncClient(timeout=300, headers=bearer(token)) as http:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(http, streams * 10 + i) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description="Parley inference benchmark")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slots", type=int, default=0, help="PARLEY_PARALLEL_SLOTS for the service (0 = auto)")
    args = parser.parse_args()
    context = 2048
    with tempfile.TemporaryDirectory() as data:
        env = {"PARLEY_DATA_DIR": data, "PARLEY_HTTP_PORT": str(free_port()), "PARLEY_ADMIN_PORT": str(free_port()),
               "PARLEY_CONTEXT_LENGTH": str(context), "PARLEY_PARALLEL_SLOTS": str(args.slots),
               "PARLEY_QUEUE_DEPTH": "32", "PARLEY_LOG_LEVEL": "WARNING", "PARLEY_ADMIN_PASSWORD": ADMIN_PASSWORD,
               # The benchmark's requests would trip a user's default rate limits.
               "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE": "100000", "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE": "100000000"}
        for name in ("auth", "session", "cache", "inference"):
            env[f"PARLEY_{name.upper()}_PORT"] = str(free_port())
        stack = Stack(env=env, log_dir=Path(data) / "logs")
        stack.start()
        try:
            stack.wait_healthy(timeout=300)
            token = httpx.post(f"{stack.url}/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD},
                               timeout=30).json()["tokens"]["access_token"]
            threads = stack_threads(stack, token)
            direct = bench_direct(args.runs, threads, context)
            via_grpc = bench_grpc(f"127.0.0.1:{stack.common.port_of('inference')}", args.runs, token)
            via_rest = bench_rest(stack.url, args.runs, token)
            via_session, cached_ms = bench_session(stack.url, args.runs, token)
            aggregate = {n: asyncio.run(bench_concurrent(stack.url, n, token)) for n in (1, 4, 8)}
        finally:
            stack.stop()
    print(f"\nParley inference benchmark — {MODEL}, {threads} threads, greedy, up to {MAX_TOKENS} tokens, "
          f"median of {args.runs} runs\n")
    print(f"{'path':34} {'decode tok/s':>12} {'ratio':>7} {'TTFT ms':>9} {'ratio':>7}")
    for name, (decode, ttft) in (("(a) llama-cpp-python in-process", direct), ("(b) gRPC Generate stream", via_grpc),
                                 ("(c) Envoy REST SSE", via_rest), ("(d) session chat turn SSE", via_session)):
        print(f"{name:34} {decode:12.1f} {decode / direct[0]:7.3f} {ttft:9.1f} {ttft / direct[1]:7.3f}")
    print(f"\n{'cached deterministic turn (d)':34} {cached_ms:9.1f} ms to the whole answer "
          f"({cached_ms / direct[1]:.3f} of (a)'s TTFT)")
    print(f"\n{'concurrent streams (Envoy REST)':34} {'aggregate tok/s':>15} {'ratio vs (a)':>13}")
    for n, rate in aggregate.items():
        print(f"{n:<34} {rate:15.1f} {rate / direct[0]:13.3f}")


def stack_threads(stack: Stack, token: str) -> int:
    with httpx.Client(headers=bearer(token)) as http:
        return int(http.get(f"{stack.url}/v1/admin/hardware").json()["chosen"]["threads"])


if __name__ == "__main__":
    main()
