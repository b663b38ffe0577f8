"""Decode speed and time to first token on the bundled model, along four paths, in one run:

  (a) llama-cpp-python called directly in this process (the baseline)
  (b) the inference service's gRPC Generate stream
  (c) Envoy's REST path, /v1/chat/completions with stream=true (SSE)
  (d) a saved conversation's turn, POST /v1/sessions/{id}:chat (SSE): session stores both messages,
      counts the history's tokens and asks the cache before inference generates

plus the time to the whole answer of a deterministic turn served from the response cache, and
aggregate throughput for 1, 4 and 8 concurrent streams through Envoy. Every figure is printed as a
ratio against (a). The paths take turns within each round, so that a slow spell of this shared
machine weighs on all of them alike. Every request gets a distinct prompt, so no path is helped by a
fully cached prompt; all paths may reuse the shared chat-template prefix, as llama-cpp-python does.

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
from collections.abc import Callable
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

# One request with prompt i -> when it was sent and when each of its tokens arrived.
Run = Callable[[int], tuple[float, list[float]]]


def prompt(i: int) -> str:
    return f"Story number {i}: write a long, detailed story about a dragon who learns to sail."


def rates(stamps: list[float], start: float) -> tuple[float, float]:
    """(decode tokens/s after the first token, time to first token in ms)."""
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return decode, (stamps[0] - start) * 1000


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def direct_path(threads: int, context: int) -> Run:
    """llama-cpp-python in this process. The model is loaded before the clock starts and closed after
    each request: an idle Llama left open here measurably slows the service's decoding on 2 cores."""
    def run(i: int) -> tuple[float, list[float]]:
        llm = Llama(model_path=CatalogueEntry(**BUNDLED).path(), n_ctx=context, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
        try:
            llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=1)  # warm, as the service is
            start = time.perf_counter()
            stream = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt(i)}], max_tokens=MAX_TOKENS, temperature=0, stream=True,
            )
            return start, [time.perf_counter() for chunk in stream if chunk["choices"][0]["delta"].get("content")]
        finally:
            llm.close()

    return run


def grpc_path(channel: grpc.Channel, token: str) -> Run:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)

    def run(i: int) -> tuple[float, list[float]]:
        request = pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content=prompt(i))],
                                     sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        start = time.perf_counter()
        replies = stub.Generate(request, metadata=(("authorization", f"Bearer {token}"),))
        return start, [time.perf_counter() for reply in replies if reply.text]

    return run


def _sse_body(i: int, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}


def rest_path(http: httpx.Client, url: str) -> Run:
    def run(i: int) -> tuple[float, list[float]]:
        stamps = []
        start = time.perf_counter()
        with http.stream("POST", f"{url}/v1/chat/completions", json=_sse_body(i)) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        return start, stamps

    return run


def session_path(http: httpx.Client, url: str) -> Run:
    """A deterministic turn in a new session (a cached answer arrives as one delta)."""

    def run(i: int) -> tuple[float, list[float]]:
        start = time.perf_counter()  # creating the session is part of the turn's cost
        sid = http.post(f"{url}/v1/sessions", json={}).json()["id"]
        stamps = []
        body = {"content": prompt(i), "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0}}
        with http.stream("POST", f"{url}/v1/sessions/{sid}:chat", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and "delta" in json.loads(line[6:]):
                    stamps.append(time.perf_counter())
        return start, stamps

    return run


def interleaved(paths: dict[str, Run], runs: int) -> dict[str, tuple[float, float]]:
    """Median (decode tok/s, TTFT ms) per path; round 0 warms up and is not counted."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for round_ in range(runs + 1):
        for n, (name, run) in enumerate(paths.items()):
            start, stamps = run(1000 * n + round_)
            if round_:
                results[name].append(rates(stamps, start))
    return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in results.items()}


def cached_turns(run: Run, runs: int, first_prompt: int) -> float:
    """Median ms to the whole answer of turns that `run` already asked (response cache hits)."""
    times = []
    for round_ in range(1, runs + 1):
        start, stamps = run(first_prompt + round_)
        times.append((stamps[-1] - start) * 1000)
    return statistics.median(times)


async def bench_concurrent(url: str, streams: int, token: str, max_tokens: int = 64) -> float:
    async def one(http: httpx.AsyncClient, i: int) -> int:
        tokens = 0
        async with http.stream("POST", f"{url}/v1/chat/completions", json=_sse_body(i, max_tokens)) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    tokens += 1
        return tokens

    async with httpx.AsyncClient(timeout=300, headers=bearer(token)) as http:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(http, 10_000 + streams * 10 + i) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - start)


def stack_threads(stack: Stack, token: str) -> int:
    with httpx.Client(headers=bearer(token)) as http:
        return int(http.get(f"{stack.url}/v1/admin/hardware").json()["chosen"]["threads"])


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
            env[f"PARLEY_{name.upper()}_METRICS_PORT"] = str(free_port())
        stack = Stack(env=env, log_dir=Path(data) / "logs")
        stack.start()
        try:
            stack.wait_healthy(timeout=300)
            token = httpx.post(f"{stack.url}/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD},
                               timeout=30).json()["tokens"]["access_token"]
            threads = stack_threads(stack, token)
            with grpc.insecure_channel(f"127.0.0.1:{stack.common.port_of('inference')}") as channel, \
                    httpx.Client(timeout=120, headers=bearer(token)) as http:
                session = session_path(http, stack.url)
                paths = {"(a) llama-cpp-python in-process": direct_path(threads, context),
                         "(b) gRPC Generate stream": grpc_path(channel, token),
                         "(c) Envoy REST SSE": rest_path(http, stack.url),
                         "(d) session chat turn SSE": session}
                measured = interleaved(paths, args.runs)
                cached_ms = cached_turns(session, args.runs, 3000)
            aggregate = {n: asyncio.run(bench_concurrent(stack.url, n, token)) for n in (1, 4, 8)}
        finally:
            stack.stop()
    direct = measured["(a) llama-cpp-python in-process"]
    print(f"\nParley inference benchmark — {MODEL}, {threads} threads, greedy, up to {MAX_TOKENS} tokens, "
          f"median of {args.runs} interleaved rounds\n")
    print(f"{'path':34} {'decode tok/s':>12} {'ratio':>7} {'TTFT ms':>9} {'ratio':>7}")
    for name, (decode, ttft) in measured.items():
        print(f"{name:34} {decode:12.1f} {decode / direct[0]:7.3f} {ttft:9.1f} {ttft / direct[1]:7.3f}")
    print(f"\n{'cached deterministic turn (d)':34} {cached_ms:9.1f} ms to the whole answer "
          f"({cached_ms / direct[1]:.3f} of (a)'s TTFT)")
    print(f"\n{'concurrent streams (Envoy REST)':34} {'aggregate tok/s':>15} {'ratio vs (a)':>13}")
    for n, rate in aggregate.items():
        print(f"{n:<34} {rate:15.1f} {rate / direct[0]:13.3f}")


if __name__ == "__main__":
    main()
