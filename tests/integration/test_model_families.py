"""Model families through Envoy: the bundled model served under real templates of real families
(llama.cpp's collection, given as the catalogue entry's params.chat_template file), driven with the
openai SDK as a team would: plain chat with a system message, a forced tool call, the follow-up with
the tool's result, a JSON schema, a stream, and reasoning on and off where the template opens a
reasoning block. The toy weights cannot write a family's own call syntax (the parsers' own tests feed
real outputs); what this shows is that every family's prompt renders, grammars hold, and reasoning
never leaks into the content."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.stack import Stack
from tests.integration.conftest import ADMIN_PASSWORD, Caller, new_user, sign_in, start_stack
from tests.llama_sdist import template
from tests.llama_server import BUNDLED, model_path

# One of each kind of template (the whole collection renders in tests/unit/inference/test_chat_template.py,
# and every family's parser has its own unit tests): kept to eight, ~11 s each on two cores.
FAMILIES = {
    "hermes3": "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "qwq": "Qwen-QwQ-32B.jinja",
    "llama31": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "r1-distill": "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "gpt-oss": "openai-gpt-oss-120b.jinja",
    "gemma2": "google-gemma-2-2b-it.jinja",
}
# Families whose generation prompt opens the reasoning block (thinking on): the tiny model never
# closes it, so its whole answer is reasoning.
OPENS_THINKING = {"qwq", "r1-distill"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
    "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
SYSTEM = {"role": "system", "content": "You are terse."}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
OFF = {"reasoning_effort": "none"}


@pytest.fixture(scope="module")
def families_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("families")
    catalogue = []
    for model, name in FAMILIES.items():
        path = Path(data_dir) / name
        path.write_text(template(name))
        catalogue.append({"id": model, "source": BUNDLED, "params": {"chat_template": str(path)}})
    # The bundled GGUF relabelled with Llama 3.1's template (gguf-py's gguf_new_metadata, as a team
    # fixes a model's template): the template comes from the file's own metadata.
    template_file = Path(data_dir) / "llama31.jinja"
    template_file.write_text(template(FAMILIES["llama31"]))
    relabelled = Path(data_dir) / "relabelled.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template-file", str(template_file),
                    "--force", model_path(), str(relabelled)], check=True, capture_output=True, timeout=120)
    catalogue.append({"id": "relabelled", "source": str(relabelled)})
    models_file = Path(data_dir) / "models.json"
    models_file.write_text(json.dumps(catalogue))
    running = start_stack(data_dir, PARLEY_MODELS_FILE=str(models_file), PARLEY_DEFAULT_MODEL="hermes3",
                          PARLEY_CONTEXT_LENGTH="2048", PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE="1000")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def caller(families_stack: Stack) -> Caller:
    return new_user(families_stack.url, "families")


@pytest.fixture(scope="module")
def client(families_stack: Stack, caller: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{families_stack.url}/v1", api_key=caller.api_key, max_retries=0)


@pytest.fixture(scope="module")
def admin(families_stack: Stack) -> Caller:
    return sign_in(families_stack.url, "admin", ADMIN_PASSWORD)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_a_family_serves_chat_tools_schemas_and_streams(model: str, client: openai.OpenAI, families_stack: Stack,
                                                       admin: Caller) -> None:
    short = {"model": model, "temperature": 0, "max_tokens": 24}
    try:
        # Plain chat with a system message (Gemma has no system role: it is folded in, not refused).
        plain = client.chat.completions.create(messages=[SYSTEM, QUESTION], extra_body=OFF, **short)
        message = plain.choices[0].message
        assert plain.choices[0].finish_reason in ("stop", "length") and message.content
        assert "<think>" not in message.content and "</think>" not in message.content

        # A forced tool call: a call, never markup in the content.
        forced = client.chat.completions.create(messages=[SYSTEM, QUESTION], tools=[WEATHER], tool_choice="required",
                                                parallel_tool_calls=False, extra_body=OFF, **{**short, "max_tokens": 48})
        choice = forced.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
        assert not (choice.message.content or "").strip()

        # The follow-up with the tool's result (arguments given back as the client got them).
        follow = client.chat.completions.create(
            messages=[SYSTEM, QUESTION, choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}],
            tools=[WEATHER], extra_body=OFF, **short)
        assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")

        # A JSON schema holds.
        person = client.chat.completions.create(
            messages=[{"role": "user", "content": "Describe a person."}], extra_body=OFF, **{**short, "max_tokens": 64},
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        assert person.choices[0].finish_reason == "stop"
        assert set(json.loads(person.choices[0].message.content)) == {"name", "age"}

        # A stream adds up to the same answer as the plain one.
        pieces, reasons = [], []
        for chunk in client.chat.completions.create(messages=[SYSTEM, QUESTION], extra_body=OFF, stream=True, **short):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
        assert "".join(pieces) == message.content and reasons[-1] == plain.choices[0].finish_reason

        # Reasoning on: where the prompt opens the block, the answer so far is reasoning, not content.
        thinking = client.chat.completions.create(messages=[QUESTION], **short)
        dumped = thinking.choices[0].message.model_dump()
        if model in OPENS_THINKING:
            assert dumped.get("reasoning_content") and not thinking.choices[0].message.content
            assert thinking.usage.completion_tokens_details.reasoning_tokens > 0
            streamed = [(c.choices[0].delta.model_dump().get("reasoning_content") or "")
                        for c in client.chat.completions.create(messages=[QUESTION], stream=True, **short) if c.choices]
            assert "".join(streamed) == dumped["reasoning_content"]
        else:
            assert thinking.choices[0].message.content
    finally:  # one family's weights at a time
        httpx.post(f"{families_stack.url}/v1/models/{model}:unload", headers=admin.headers, timeout=30)


@pytest.mark.parametrize(("model", "chat_format"), [("gpt-oss", "gpt-oss"), ("relabelled", "llama3")])
def test_the_model_says_its_chat_format(model: str, chat_format: str, families_stack: Stack, caller: Caller,
                                        client: openai.OpenAI) -> None:
    client.chat.completions.create(model=model, messages=[SYSTEM, QUESTION], max_tokens=2)
    answer = httpx.get(f"{families_stack.url}/v1/models/{model}", headers=caller.headers, timeout=30)
    assert answer.status_code == 200 and answer.json()["chat_format"] == chat_format, answer.text
    forced = client.chat.completions.create(model=model, messages=[QUESTION], tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=48, temperature=0)
    assert forced.choices[0].finish_reason == "tool_calls" and forced.choices[0].message.tool_calls


def test_bad_template_options_are_a_400(client: openai.OpenAI) -> None:
    for extra in ({"chat_template_kwargs": ["x"]}, {"reasoning_effort": "extreme"},
                  {"chat_template_kwargs": {"messages": []}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="qwen3", messages=[QUESTION], max_tokens=2, extra_body=extra)
