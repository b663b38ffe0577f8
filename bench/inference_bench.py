"""Decode speed and time to first token on the bundled model, along four paths, in one run:

  (a) llama-cpp-python called directly in this process (the baseline)
  (b) the inference service's gRPC Generate stream
  (c) Envoy's REST path, /v1/chat/completions with stream=true (SSE)
  (d) a saved conversation's turn, POST /v1/sessions/{id}:chat (SSE): session reads the history and
      stores both messages around one Generate call, which checks the rate limit and the response
      cache and fits the history to the context window before the engine runs

plus the time to the whole answer of a deterministic turn served from the response cache, and one
conversation of 60 short turns, as a saved session and through /v1/chat/completions (TTFT of turns
2-6 against the last five: a turn must not get slower as the conversation grows). Every figure of
(a)-(d) is printed as a ratio against (a). The paths take turns within each round, so that a slow
spell of this shared machine weighs on all of them alike. Every request gets a distinct prompt, so no
path is helped by a fully cached prompt; all paths may reuse the shared chat-template prefix, as
llama-cpp-python does.

Then the client patterns that users create, each driven with the official `openai` SDK (streaming,
greedy, usage counted from `stream_options.include_usage`) against Parley's Envoy gateway and, in
the same run, against llama-server (the peer: one llama.cpp context, continuous batching; same
llama.cpp version as Parley links), started here as `-np 8 -c 16384` on the same model and threads,
and against the same llama-server with its draft-free speculative decoding (`--spec-type ngram-mod`,
its defaults otherwise; off by default in llama-server):

  1. 1, 4 and 8 concurrent single-turn streams (64 tokens): aggregate tok/s, TTFT p50
  2. one conversation of 10 turns, each resending the whole history: TTFT p50 of turns 2-10, tok/s
  3. 8 conversations x 6 turns at once (interleaved): aggregate tok/s, TTFT p50 of turns 2-6
  4. 16 conversations x 6 turns at once: the same figures
  5. 8 concurrent streams (128 tokens) whose answer must follow a JSON schema (response_format json_schema), and
     8 whose answer must be a call of a tool (tool_choice required): the grammar's cost under load,
     and the % of answers that follow the schema or call the tool with valid arguments (the first
     tool-call delta counts as the first token)
  6. one stream copying a given paragraph (the answer repeats ~100 tokens of its prompt: where
     speculative decoding's drafts are accepted): tok/s, TTFT p50

Conversations share one system prompt (~100 tokens), open with distinct questions and go on with
short follow-ups, 48 tokens per answer. The two servers take turns pattern by pattern (never both
under load at once); aggregate tok/s counts from the first request to the last token, so it includes
the time to the first tokens. Each server's resident memory is read after the patterns. Without a
llama-server binary its column is skipped.

The remote path (`--only remote`, and part of every run with a llama-server): a second stack whose
only model is engine "remote" in front of a llama-server (the same binary and flags as above), and the
8 concurrent streams of pattern 1 through Parley -> llama-server against the same llama-server called
directly, taking turns in the same run: aggregate tok/s (target >= 0.95x) and TTFT p50 (target <= +5
ms) — what Parley's accounts, rate limits, cache and metrics cost in front of an existing engine.
llama-server gets half the cores to itself and Parley, Envoy and the client the other half (in both
cases): sharing cores, the proxy's work stalls the engine's decode threads (measured here, 2 cores:
one round took 67 s against 17 s), which says nothing about a proxy in front of a GPU server.

Last, embeddings throughput through Envoy against transformers in-process (bench/embeddings_bench.py).

    make bench [LLAMA_SERVER=/path/to/llama-server]
    .venv/bin/python bench/inference_bench.py [--runs 5] [--rounds 3] [--llama-server PATH] [--quick]
    make bench-embeddings      # the embeddings section alone (--embeddings-only)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import grpc
import httpx
from llama_cpp import Llama
from openai import AsyncOpenAI
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc

from services.inference.models.registry import BUNDLED, CatalogueEntry
from services.stack import Stack, free_port

import embeddings_bench  # beside this file: python puts the script's folder on sys.path

ADMIN_PASSWORD = f"Bench-{uuid.uuid4().hex}"
MODEL = BUNDLED["id"]
MAX_TOKENS = 96
SPECULATIVE = "ngram-mod"  # llama-server's draft-free speculative decoding, the third column
DEFAULT_LLAMA_SERVER = Path("/root/.cache/parley-peer/llama-server")
BUILD_LLAMA_SERVER = (
    "make llama-server, or by hand: pip download llama-cpp-python==<the version in requirements/base.txt> "
    "--no-deps --no-binary :all:, unpack it, then in vendor/llama.cpp: "
    "cmake -B build -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && "
    "cmake --build build --target llama-server -j2 (see docs/benchmarks.md)"
)
SYSTEM_PROMPT = (
    "You are Parley, a friendly and knowledgeable assistant for a small team. Answer in plain English, "
    "in short paragraphs, without lists or headings unless the user asks for them. Be accurate: when "
    "you are not sure of a fact, say so instead of guessing. Keep a warm and patient tone, explain "
    "technical words the first time you use them, and prefer concrete examples to general advice. "
    "When the user asks you to go on, continue exactly where your previous answer stopped, without "
    "repeating what you already said."
)
TOPICS = (
    "how bread rises", "why the sky is blue", "how a lighthouse works", "the life of honeybees",
    "how tides happen", "how a bicycle stays upright", "the history of paper", "how volcanoes form",
    "why cats purr", "how rainbows appear", "how ships float", "the first trains",
    "how bees make honey", "why leaves change colour", "how a compass works", "the history of tea",
)
FOLLOW_UPS = ("Go on.", "Say more about that.", "Why is that?", "Give me an example.", "And then?",
              "Can you explain that more simply?", "What else should I know?", "Tell me more.", "Go on, please.")

# One request with prompt i -> when it was sent and when each of its tokens arrived.
Run = Callable[[int], tuple[float, list[float]]]


COPY_SENTENCES = (
    "The harbour master walked the length of the pier before dawn, counting the boats tied along it.",
    "Gulls followed the fishing fleet out past the breakwater, calling over the grey and restless water.",
    "By noon the market square was full of carts selling apples, cheese, wool and hand-carved spoons.",
    "An old clock above the bakery door had run five minutes slow for as long as anyone could remember.",
    "In the evening the lamplighter made his rounds, and one by one the narrow streets filled with light.",
    "Children raced paper boats along the gutter after the rain, shouting whenever one of them capsized.",
)
STRUCTURED_ASK = "invent a customer record for our shop, and tell me the weather where they live."
CUSTOMER = {"type": "object", "additionalProperties": False, "required": ["name", "city", "age", "tier", "tags"],
            "properties": {"name": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 30},
                           "age": {"type": "integer"}, "tier": {"enum": ["free", "team", "enterprise"]},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                                 "parameters": {"type": "object", "required": ["city"], "properties": {
                                                     "city": {"type": "string", "maxLength": 30},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}}}}}


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


def _sse_body(i: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": MAX_TOKENS,
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
        sid = http.post(f"{url}/v1/sessions", json={}).json()["id"]
        start = time.perf_counter()
        stamps = []
        body = {"content": prompt(i), "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0}}
        with http.stream("POST", f"{url}/v1/sessions/{sid}:chat", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and "delta" in json.loads(line[6:]):
                    stamps.append(time.perf_counter())
        return start, stamps

    return run


def first_delta(response: httpx.Response, key: Callable[[dict], Any]) -> tuple[float, str]:
    """When the first text of an SSE answer arrived, and the whole text."""
    first, parts = 0.0, []
    for line in response.iter_lines():
        if line.startswith("data: {"):
            text = key(json.loads(line[6:]))
            if text:
                first = first or time.perf_counter()
                parts.append(text)
    return first, "".join(parts)


LONG_QUESTION = "Turn {}: name one colour, in one word."
LONG_SAMPLING = {"max_tokens": 8, "temperature": 0}


def long_conversation(http: httpx.Client, url: str, turns: int) -> dict[str, list[float]]:
    """One conversation of `turns` short turns (8-token answers, greedy) as a saved session and, with
    the same questions, through /v1/chat/completions resending the history: TTFT (ms) of each turn."""
    ttfts: dict[str, list[float]] = {"session turn": []}
    sid = http.post(f"{url}/v1/sessions", json={"system_prompt": SYSTEM_PROMPT}).json()["id"]
    for k in range(turns):
        start = time.perf_counter()
        with http.stream("POST", f"{url}/v1/sessions/{sid}:chat",
                         json={"content": LONG_QUESTION.format(k + 1), "sampling": LONG_SAMPLING}) as response:
            first, _ = first_delta(response, lambda e: e.get("delta", {}).get("text"))
        ttfts["session turn"].append((first - start) * 1000)
    ttfts["OpenAI path"] = openai_turns(http, url, turns, turns)
    return ttfts


def openai_turns(http: httpx.Client, url: str, turns: int, first: int) -> list[float]:
    """The long conversation through `url`/v1/chat/completions, resending the history: TTFT (ms) of each turn."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    ttfts = []
    for k in range(turns):
        messages.append({"role": "user", "content": LONG_QUESTION.format(first + k + 1)})
        start = time.perf_counter()
        with http.stream("POST", f"{url}/v1/chat/completions",
                         json={"model": MODEL, "messages": messages, "stream": True, **LONG_SAMPLING}) as response:
            arrived, text = first_delta(response, lambda e: (e["choices"] or [{}])[0].get("delta", {}).get("content"))
        ttfts.append((arrived - start) * 1000)
        messages.append({"role": "assistant", "content": text})
    return ttfts


def peer_long_conversation(binary: Path, threads: int, turns: int, log_dir: Path) -> list[float]:
    """The same conversation (the OpenAI path's questions) on llama-server, its default flags."""
    # A connection per request: llama-server's HTTP library closes a keep-alive connection after a few.
    with llama_server(binary, threads, log_dir / "llama-server-long.log") as server, \
            httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        return openai_turns(http, server.base_url.removesuffix("/v1"), turns, turns)


def print_long_conversation(ttfts: dict[str, list[float]]) -> None:
    turns = len(next(iter(ttfts.values())))
    print(f"\nOne conversation of {turns} turns (8-token answers): TTFT p50 in ms, early turns against the last five\n")
    print(f"{'path':16} {'turns 2-6':>10} {f'turns {turns - 4}-{turns}':>12} {'growth':>7}")
    growth = {}
    for name, values in ttfts.items():
        early, late = statistics.median(values[1:6]), statistics.median(values[-5:])
        growth[name] = late / early
        print(f"{name:16} {early:10.1f} {late:12.1f} {late / early:7.2f}", flush=True)
    if "llama-server" in growth:
        print(f"\ngrowth / llama-server's: session {growth['session turn'] / growth['llama-server']:.3f}, "
              f"OpenAI path {growth['OpenAI path'] / growth['llama-server']:.3f} (target: <= 0.8)", flush=True)


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


@dataclass(frozen=True)
class Server:
    """An OpenAI-compatible endpoint under test and the process whose memory counts for it."""
    name: str
    base_url: str
    api_key: str
    pid: int


@dataclass(frozen=True)
class Pattern:
    """`conversations` at once, each `turns` turns long; TTFT counts turns after the first when there are several."""
    name: str
    conversations: int
    turns: int
    max_tokens: int
    chat: bool  # the shared system prompt, topic openings and follow-ups; else one story prompt per stream
    extra: dict[str, Any] = field(default_factory=dict)  # more request fields: response_format, tools
    copy: bool = False  # the answer repeats a paragraph given in the prompt

    def opening(self, k: int, round_: int) -> list[dict[str, str]]:
        """The first messages of conversation k, distinct per pattern and round so that no answer comes from a
        cache and no conversation starts with another's prompt."""
        if self.extra:
            return [{"role": "user", "content": f"Customer {k} of round {round_}: {STRUCTURED_ASK}"}]
        if self.copy:  # the sentences in an order of its own: no answer comes from a cache
            start = (round_ * 7 + k) % len(COPY_SENTENCES)
            paragraph = " ".join(COPY_SENTENCES[start:] + COPY_SENTENCES[:start])
            return [{"role": "user", "content": f"Copy this paragraph exactly, word for word:\n\n{paragraph}"}]
        if not self.chat:
            return [{"role": "user", "content": prompt(20_000 + 1000 * round_ + 100 * self.conversations + k)}]
        topic = TOPICS[k % len(TOPICS)]
        question = f"Question {k + 1} of {self.conversations}, round {round_ + 1}: tell me about {topic}."
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def patterns(quick: bool) -> list[Pattern]:
    long, short = (4, 3) if quick else (10, 6)
    return [*(Pattern(f"{n} stream{'s' * (n > 1)}", n, 1, 64, chat=False) for n in (1, 4, 8)),
            Pattern(f"1 conversation x {long} turns", 1, long, 48, chat=True),
            Pattern(f"8 conversations x {short} turns", 8, short, 48, chat=True),
            Pattern(f"16 conversations x {short} turns", 16, short, 48, chat=True),
            Pattern("8 streams, json_schema", 8, 1, 128, chat=False, extra={"response_format": {
                "type": "json_schema", "json_schema": {"name": "customer", "strict": True, "schema": CUSTOMER}}}),
            Pattern("8 streams, tool call", 8, 1, 128, chat=False, extra={
                "tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False}),
            Pattern("1 stream, copy a paragraph", 1, 1, 160, chat=False, copy=True)]


@dataclass(frozen=True)
class Reply:
    ttft_ms: float
    tokens: int
    text: str
    calls: tuple[tuple[str, str], ...] = ()  # (name, arguments) of the tool calls, assembled from the deltas


async def stream_reply(client: AsyncOpenAI, messages: list[dict[str, str]], max_tokens: int,
                       extra: dict[str, Any] | None = None) -> Reply:
    """One streamed answer. Tokens are usage.completion_tokens when the server reports usage, else content
    chunks. The first token is the first content or tool-call delta."""
    start = time.perf_counter()
    first, chunks, usage, text = 0.0, 0, None, []
    calls: dict[int, list[str]] = {}
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, **(extra or {}),
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                first = first or time.perf_counter()
                name, arguments = calls.setdefault(call.index, ["", ""])
                function = call.function
                calls[call.index] = [name + (function.name or "" if function else ""),
                                     arguments + (function.arguments or "" if function else "")]
            if choice.delta.content:
                first = first or time.perf_counter()
                chunks += 1
                text.append(choice.delta.content)
    first = first or time.perf_counter()  # an empty answer: its first token is its end
    return Reply((first - start) * 1000, usage if usage is not None else chunks, "".join(text),
                 tuple((n, a) for n, a in (calls[i] for i in sorted(calls))))


def follows(pattern: Pattern, reply: Reply) -> bool:
    """Whether a structured pattern's answer is what it asked for: JSON valid under the schema, or a
    call of the tool whose arguments validate against its parameters."""
    import jsonschema

    try:
        if "response_format" in pattern.extra:
            jsonschema.validate(json.loads(reply.text), CUSTOMER)
            return True
        function = WEATHER_TOOL["function"]
        if not reply.calls:
            return False
        for name, arguments in reply.calls:
            if name != function["name"]:
                return False
            jsonschema.validate(json.loads(arguments), function["parameters"])
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


async def conversation(client: AsyncOpenAI, pattern: Pattern, k: int, round_: int) -> list[Reply]:
    """Each turn resends the whole history with the assistant's earlier answers, as chat clients do."""
    messages = pattern.opening(k, round_)
    replies = []
    for turn in range(pattern.turns):
        if turn:
            messages.append({"role": "user", "content": FOLLOW_UPS[(k + turn - 1) % len(FOLLOW_UPS)]})
        reply = await stream_reply(client, messages, pattern.max_tokens, pattern.extra)
        messages.append({"role": "assistant", "content": reply.text})
        replies.append(reply)
    return replies


async def drive(client: AsyncOpenAI, pattern: Pattern, round_: int) -> tuple[float, list[float], list[bool]]:
    """Every conversation of the pattern at once -> (aggregate tok/s, TTFTs of the counted turns in ms, and
    for a structured pattern whether each answer follows its schema or tool)."""
    start = time.perf_counter()
    runs = await asyncio.gather(*(conversation(client, pattern, k, round_) for k in range(pattern.conversations)))
    elapsed = time.perf_counter() - start
    counted = slice(1, None) if pattern.turns > 1 else slice(None)
    return (sum(r.tokens for replies in runs for r in replies) / elapsed,
            [r.ttft_ms for replies in runs for r in replies[counted]],
            [follows(pattern, r) for replies in runs for r in replies] if pattern.extra else [])


async def measure_patterns(servers: list[Server], todo: list[Pattern], rounds: int, shared_upstream: bool = False
                           ) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(pattern, server) -> (median aggregate tok/s over rounds, TTFT p50 ms over all counted turns, % of the
    answers that follow the pattern's schema or tool).
    The servers take turns pattern by pattern, in an order that alternates each round; one warm-up
    request each is not counted."""
    # The SDK's default retries: llama-server's HTTP library closes a keep-alive connection after a few
    # requests, and a request racing that close fails to connect; the retry's time counts in its TTFT.
    clients = {s.name: AsyncOpenAI(base_url=s.base_url, api_key=s.api_key, max_retries=2, timeout=600) for s in servers}
    rates: dict[tuple[str, str], list[float]] = {}
    ttfts: dict[tuple[str, str], list[float]] = {}
    valid: dict[tuple[str, str], list[bool]] = {}
    try:
        for client in clients.values():
            await stream_reply(client, [{"role": "user", "content": "Hi"}], 4)
        for round_ in range(rounds):
            for pattern in todo:
                for server in servers[::-1] if round_ % 2 else servers:
                    # Servers in front of one upstream get prompts of their own: the first would warm the
                    # upstream's prompt cache for the second.
                    key = round_ * len(servers) + servers.index(server) if shared_upstream else round_
                    rate, samples, follow = await drive(clients[server.name], pattern, key)
                    rates.setdefault((pattern.name, server.name), []).append(rate)
                    ttfts.setdefault((pattern.name, server.name), []).extend(samples)
                    valid.setdefault((pattern.name, server.name), []).extend(follow)
    finally:
        for client in clients.values():
            await client.close()
    return {key: (statistics.median(rates[key]), statistics.median(ttfts[key]),
                  100 * sum(valid[key]) / len(valid[key]) if valid[key] else 100.0) for key in rates}


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (VmRSS from /proc), in MiB."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return total


REMOTE = Pattern("remote: 8 streams", 8, 1, 64, chat=False)


def stack_environment(data: str, **more: str) -> dict[str, str]:
    """A benchmark stack's settings on free ports; no rate limits in the way."""
    env = {"PARLEY_DATA_DIR": data, "PARLEY_HTTP_PORT": str(free_port()), "PARLEY_ADMIN_PORT": str(free_port()),
           "PARLEY_QUEUE_DEPTH": "32", "PARLEY_LOG_LEVEL": "WARNING", "PARLEY_ADMIN_PASSWORD": ADMIN_PASSWORD,
           # The benchmark's requests would trip a user's default rate limits.
           "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE": "100000", "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE": "100000000",
           **more}
    for name in ("auth", "session", "cache", "inference"):
        env[f"PARLEY_{name.upper()}_PORT"] = str(free_port())
        env[f"PARLEY_{name.upper()}_METRICS_PORT"] = str(free_port())
    env["PARLEY_SESSION_WEBSOCKET_PORT"] = str(free_port())  # its default port may be taken
    return env


def api_key(stack: Stack) -> str:
    """An API key of the admin: a run outlasts an access token's lifetime."""
    access = httpx.post(f"{stack.url}/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD},
                        timeout=30).json()["tokens"]["access_token"]
    return httpx.post(f"{stack.url}/v1/api-keys", json={"name": "bench"}, headers=bearer(access),
                      timeout=30).json()["secret"]


def split_cores() -> tuple[set[int], set[int]]:
    """The upstream's cores and the rest (Parley, Envoy and the client), half each: an engine's
    decode threads stall whenever anything else takes one of their cores, and in production the
    upstream has its own machine (or GPU)."""
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    return set(cores[:half]), set(cores[half:]) or set(cores)


def measure_remote(binary: Path, rounds: int, log_dir: Path) -> tuple[dict[tuple[str, str], tuple[float, float, float]], int]:
    """REMOTE on Parley (a remote model in front of llama-server) and on the same llama-server directly ->
    figures and the upstream's threads. llama-server runs on its own half of the cores, Parley and the
    client on the other half, in both cases."""
    upstream_cores, other_cores = split_cores()
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, other_cores)  # the stack's processes inherit it
    try:
        return _measure_remote(binary, rounds, log_dir, upstream_cores), len(upstream_cores)
    finally:
        os.sched_setaffinity(0, mine)


def _measure_remote(binary: Path, rounds: int, log_dir: Path, cores: set[int]
                    ) -> dict[tuple[str, str], tuple[float, float, float]]:
    with llama_server(binary, len(cores), log_dir / "llama-server-remote.log", cores=cores) as upstream, \
            tempfile.TemporaryDirectory() as data:
        catalogue = Path(data) / "models.json"
        catalogue.write_text(json.dumps([{
            "id": MODEL, "engine": "remote", "source": upstream.base_url, "context_length": 2048,
            "params": {"tokenizer": BUNDLED["source"], "timeout_seconds": 120}}]))
        stack = Stack(env=stack_environment(data, PARLEY_MODELS_FILE=str(catalogue), PARLEY_CONTEXT_LENGTH="2048"),
                      log_dir=log_dir / "remote-stack")
        stack.start()
        try:
            stack.wait_healthy(timeout=300)
            parley = Server("Parley", f"{stack.url}/v1", api_key(stack), inference_pid(stack))
            return asyncio.run(measure_patterns([parley, upstream], [REMOTE], rounds, shared_upstream=True))
        finally:
            stack.stop()


def print_remote(measured: tuple[dict[tuple[str, str], tuple[float, float, float]], int], rounds: int) -> None:
    figures, threads = measured
    ours, theirs = figures[(REMOTE.name, "Parley")], figures[(REMOTE.name, "llama-server")]
    print(f"\nRemote path — Parley (engine remote) -> llama-server vs llama-server directly, {REMOTE.conversations} "
          f"concurrent streams of {REMOTE.max_tokens} tokens, median of {rounds} round{'s' * (rounds > 1)}; "
          f"llama-server on {threads} core(s) of its own (-t {threads}), Parley, Envoy and the client on the rest")
    print(f"{'metric':14} {'Parley':>9} {'llama-server':>13} {'ratio/diff':>11} target")
    print(f"{'tok/s':14} {ours[0]:9.1f} {theirs[0]:13.1f} {ours[0] / theirs[0]:11.3f} >= 0.95")
    print(f"{'TTFT p50 ms':14} {ours[1]:9.1f} {theirs[1]:13.1f} {ours[1] - theirs[1]:+11.1f} <= +5 ms", flush=True)


def find_llama_server(option: str | None) -> Path | None:
    """--llama-server, else $PARLEY_BENCH_LLAMA_SERVER, else the default cache path when it exists."""
    chosen = option or os.environ.get("PARLEY_BENCH_LLAMA_SERVER")
    if chosen == "none":  # Parley alone (e.g. two versions of it compared run by run)
        return None
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise SystemExit(f"llama-server {chosen!r} is not an executable file; build it: {BUILD_LLAMA_SERVER}")
        return Path(chosen)
    return DEFAULT_LLAMA_SERVER if os.access(DEFAULT_LLAMA_SERVER, os.X_OK) else None


@contextlib.contextmanager
def llama_server(binary: Path, threads: int, log_path: Path, timeout: float = 180,
                 cores: set[int] | None = None, slots: int = 8, speculative: bool = False) -> Iterator[Server]:
    """llama-server on the bundled model on a free loopback port, as docs/benchmarks.md describes (on `cores`
    only, when given; `slots`: -np; with its n-gram speculative decoding when `speculative`); stopped on exit."""
    port = free_port()
    argv = [str(binary), "-m", CatalogueEntry(**BUNDLED).path(), "-t", str(threads), "-np", str(slots), "-c", "16384",
            # More HTTP threads than the default (slots + 2): 16 streaming conversations otherwise wait for a
            # connection thread, and its keep-alive connections get dropped under the client.
            "--threads-http", "32", "--host", "127.0.0.1", "--port", str(port),
            "--alias", MODEL,  # the name the clients ask for; a remote model checks the upstream serves it
            "--jinja"]  # chat templates through its Jinja engine, which tools need
    if speculative:
        argv += ["--spec-type", SPECULATIVE]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"llama-server did not become healthy ({' '.join(argv)}):\n{tail}")
            time.sleep(0.25)
        yield Server(f"llama-server {SPECULATIVE}" if speculative else "llama-server",
                     f"http://127.0.0.1:{port}/v1", "no-key", process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stack_hardware(stack: Stack, token: str) -> dict:
    """The engine settings the inference service chose (threads, parallel_slots, ...)."""
    with httpx.Client(headers=bearer(token)) as http:
        return dict(http.get(f"{stack.url}/v1/admin/hardware").json()["chosen"])


def inference_pid(stack: Stack) -> int:
    return next(p.popen.pid for p in stack.processes if p.name == "inference")


def measure_peers(stack: Stack, token: str, threads: int, binary: Path | None, todo: list[Pattern], rounds: int,
                  log_dir: Path) -> tuple[dict[tuple[str, str], tuple[float, float, float]], dict[str, float]]:
    """The client patterns on Parley (through Envoy) and on llama-server, by default and with ngram-mod speculative
    decoding, when there is one -> figures, RSS MiB."""
    parley = Server("Parley", f"{stack.url}/v1", token, inference_pid(stack))
    with contextlib.ExitStack() as running:
        servers = [parley]
        if binary is not None:
            servers.append(running.enter_context(llama_server(binary, threads, log_dir / "llama-server.log")))
            servers.append(running.enter_context(llama_server(binary, threads, log_dir / "llama-server-spec.log",
                                                              speculative=True)))
        figures = asyncio.run(measure_patterns(servers, todo, rounds))
        return figures, {server.name: rss_mib(server.pid) for server in servers}


def print_patterns(figures: dict[tuple[str, str], tuple[float, float, float]], rss: dict[str, float], todo: list[Pattern],
                   rounds: int, threads: int) -> None:
    peers = ("llama-server", f"llama-server {SPECULATIVE}")
    peer = peers[0] in rss
    print(f"\nClient patterns (openai SDK, streaming, greedy) — Parley through Envoy vs llama-server -np 8 -c 16384, "
          f"by default and with --spec-type {SPECULATIVE}, {threads} threads")
    print(f"tok/s: median of {rounds} round{'s' * (rounds > 1)}, counted from the first request; "
          "TTFT: p50 over all counted turns")
    print("ratio = Parley / that llama-server: for tok/s >= 1.0 is better (Parley faster); "
          "for TTFT and RSS <= 1.0 is better\n")
    print(f"{'pattern':30} {'metric':14} {'Parley':>9} {'llama-server':>13} {'ratio':>7} {SPECULATIVE:>13} {'ratio':>7}")

    def row(pattern: str, metric: str, ours: float, *theirs: float | None) -> None:
        others = "".join((f" {other:13.1f}" if other is not None else f" {'—':>13}")
                         + (f" {ours / other:7.3f}" if other else f" {'—':>7}") for other in theirs)
        print(f"{pattern:30} {metric:14} {ours:9.1f}{others}")

    for pattern in todo:
        ours = figures[(pattern.name, "Parley")]
        theirs = [figures.get((pattern.name, name)) for name in peers]
        ttft = "TTFT p50 ms" if pattern.turns == 1 else f"TTFT p50 2-{pattern.turns}"
        row(pattern.name, "tok/s", ours[0], *(t[0] if t else None for t in theirs))
        row("", ttft, ours[1], *(t[1] if t else None for t in theirs))
        if pattern.extra:
            row("", "% valid", ours[2], *(t[2] if t else None for t in theirs))
    row("RSS after the patterns", "MiB", rss["Parley"], *(rss.get(name) for name in peers))
    if not peer:
        print(f"\nllama-server column skipped: no binary (--llama-server PATH, $PARLEY_BENCH_LLAMA_SERVER or "
              f"{DEFAULT_LLAMA_SERVER}). Build it: {BUILD_LLAMA_SERVER}")
    print("\nParley's RSS is the inference process (with any children); llama-server's is its one process.")


def main() -> None:
    parser = argparse.ArgumentParser(description="Parley inference benchmark")
    parser.add_argument("--runs", type=int, default=None,
                        help="rounds of the paths (a)-(d) (default 5, 1 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the client patterns (default 3, 1 with --quick)")
    parser.add_argument("--slots", type=int, default=0, help="PARLEY_PARALLEL_SLOTS for the service (0 = auto)")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help=f"llama-server binary to compare against (default: $PARLEY_BENCH_LLAMA_SERVER, else "
                             f"{DEFAULT_LLAMA_SERVER} when it exists; 'none': Parley alone)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round, fewer turns")
    parser.add_argument("--log-dir", default=None, help="keep the services' and llama-server's logs here")
    parser.add_argument("--turns", type=int, default=None,
                        help="turns of the long conversation (default 60, 12 with --quick; 0 skips it)")
    parser.add_argument("--no-patterns", action="store_true", help="only the paths (a)-(d) and the long conversation")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="only the client patterns whose name contains TEXT (e.g. 'json'); skips the paths (a)-(d)")
    parser.add_argument("--embeddings-only", action="store_true",
                        help="only the embeddings throughput (bench/embeddings_bench.py): a minute or two")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 5)
    turns = args.turns if args.turns is not None else (12 if args.quick else 60)
    rounds = args.rounds or (1 if args.quick else 3)
    todo = [p for p in patterns(args.quick) if args.only is None or args.only in p.name]
    remote = not args.embeddings_only and not args.no_patterns and (args.only is None or args.only in REMOTE.name)
    if not todo and not remote:
        raise SystemExit(f"no client pattern's name contains {args.only!r}")
    binary = None if args.embeddings_only else find_llama_server(args.llama_server)
    if binary is None and not args.embeddings_only:
        print(f"llama-server not found: its column and the remote path will be skipped. Build it: {BUILD_LLAMA_SERVER}",
              flush=True)
    if not todo:  # --only remote
        if binary is None:
            raise SystemExit("the remote path needs a llama-server")
        with tempfile.TemporaryDirectory() as logs:
            print_remote(measure_remote(binary, rounds, Path(args.log_dir or logs)), rounds)
        return
    context = 2048
    with tempfile.TemporaryDirectory() as data:
        env = stack_environment(data, PARLEY_CONTEXT_LENGTH=str(context), PARLEY_PARALLEL_SLOTS=str(args.slots),
                                # The same KV cells as llama-server -c 16384 (context is per request: -np 8
                                # gives 2048 a slot).
                                PARLEY_KV_CACHE_TOKENS="16384")
        logs = Path(args.log_dir) if args.log_dir else Path(data) / "logs"
        stack = Stack(env=env, log_dir=logs)
        stack.start()
        try:
            stack.wait_healthy(timeout=300)
            access = httpx.post(f"{stack.url}/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD},
                                timeout=30).json()["tokens"]["access_token"]
            # An API key: a run outlasts an access token's lifetime.
            token = httpx.post(f"{stack.url}/v1/api-keys", json={"name": "bench"}, headers=bearer(access),
                               timeout=30).json()["secret"]
            hardware = stack_hardware(stack, token)
            threads = int(hardware["threads"])
            embedded = {}
            if not args.embeddings_only:
                with grpc.insecure_channel(f"127.0.0.1:{stack.common.port_of('inference')}") as channel, \
                        httpx.Client(timeout=120, headers=bearer(token)) as http:
                    if args.only is None:
                        measured, cached_ms = measure_paths(channel, http, stack.url, token, threads, context, runs)
                        print_paths(measured, cached_ms, threads, hardware, runs)
                        if turns:
                            conversation = long_conversation(http, stack.url, turns)
                            if binary is not None:
                                conversation["llama-server"] = peer_long_conversation(binary, threads, turns, logs)
                            print_long_conversation(conversation)
                if not args.no_patterns:
                    figures, rss = measure_peers(stack, token, threads, binary, todo, rounds, logs)
                    print_patterns(figures, rss, todo, rounds, threads)
                if remote and binary is not None:
                    print_remote(measure_remote(binary, rounds, logs), rounds)
            if args.only is None and not args.no_patterns:
                embedded = embeddings_bench.measure(stack.url, token, threads, rounds)
        finally:
            stack.stop()
    if embedded:
        embeddings_bench.report(embedded, threads, rounds)


def print_paths(measured: dict[str, tuple[float, float]], cached_ms: float, threads: int, hardware: dict,
                runs: int) -> None:
    direct = measured["(a) llama-cpp-python in-process"]
    print(f"\nParley inference benchmark — {MODEL}, {threads} threads, {hardware.get('parallel_slots', '?')} "
          f"slots, greedy, up to {MAX_TOKENS} tokens, median of {runs} interleaved rounds\n")
    print(f"{'path':34} {'decode tok/s':>12} {'ratio':>7} {'TTFT ms':>9} {'ratio':>7}")
    for name, (decode, ttft) in measured.items():
        print(f"{name:34} {decode:12.1f} {decode / direct[0]:7.3f} {ttft:9.1f} {ttft / direct[1]:7.3f}")
    print(f"\n{'cached deterministic turn (d)':34} {cached_ms:9.1f} ms to the whole answer "
          f"({cached_ms / direct[1]:.3f} of (a)'s TTFT)")
    for name, target in (("(c) Envoy REST SSE", 3), ("(d) session chat turn SSE", 5)):
        print(f"{name + ' TTFT - (a) TTFT':34} {measured[name][1] - direct[1]:+9.1f} ms (target: <= +{target} ms)",
              flush=True)


def measure_paths(channel: grpc.Channel, http: httpx.Client, url: str, token: str, threads: int, context: int,
                  runs: int) -> tuple[dict[str, tuple[float, float]], float]:
    """The paths (a)-(d), interleaved -> their medians, and a cached turn's time to the whole answer."""
    session = session_path(http, url)
    paths = {"(a) llama-cpp-python in-process": direct_path(threads, context),
             "(b) gRPC Generate stream": grpc_path(channel, token),
             "(c) Envoy REST SSE": rest_path(http, url),
             "(d) session chat turn SSE": session}
    return interleaved(paths, runs), cached_turns(session, runs, 3000)


if __name__ == "__main__":
    main()
