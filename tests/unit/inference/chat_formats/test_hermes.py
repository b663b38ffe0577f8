"""Hermes tags and `<think>` blocks (Hermes 2 Pro / 3, Qwen 2.5, Qwen3, QwQ, the fallback), with
llama.cpp's tests/test-chat.cpp cases for these templates as vectors."""

from __future__ import annotations

from services.inference.chat_formats import for_template
from services.inference.chat_formats.hermes import HermesFormat
from tests.unit.inference.chat_formats.harness import check, parse

QWEN3 = HermesFormat("{% if tools %}<tool_call>{% endif %}{{ '<think>' }}")
HERMES = HermesFormat("{% if tools %}<tool_call>{% endif %}")


def test_a_call_alone_and_after_content() -> None:
    raw = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>'
    check(HERMES, raw, calls=[("special_function", {"arg1": 1})])
    check(HERMES, "Hello, world!\nWhat's up?" + raw, content="Hello, world!\nWhat's up?",
          calls=[("special_function", {"arg1": 1})])


def test_a_template_without_think_blocks_leaves_them_in_the_content() -> None:
    check(HERMES, "<think>x</think>Hi", content="<think>x</think>Hi")


def test_qwq_thinks_from_the_prompts_open_block() -> None:
    # QwQ's generation prompt ends with "<think>\n": the answer starts inside the block.
    check(QWEN3, "Let me think about this...\n</think>\nThe answer is 42.", thinking_open=True,
          content="The answer is 42.", reasoning="Let me think about this...")
    check(QWEN3, "</think>Hello, world!", thinking_open=True, content="Hello, world!")


def test_qwen3_reasoning_then_calls() -> None:
    raw = ("<think>\nI'm\nthinking\n</think>\n\n"
           '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>')
    check(QWEN3, raw, reasoning="I'm\nthinking", calls=[("special_function", {"arg1": 1})])
    check(QWEN3, "<think>I'm\nthinking</think>Hello, world!\nWhat's up?", reasoning="I'm\nthinking",
          content="Hello, world!\nWhat's up?")


def test_an_unfinished_block_is_all_reasoning() -> None:
    check(QWEN3, "<think>still going ", reasoning="still going")
    check(QWEN3, "  not thinking", content="  not thinking")
    check(QWEN3, "<thin", content="<thin")


def test_a_call_cut_short_by_max_tokens_is_a_call() -> None:
    raw = '<think>ok</think><tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    check(QWEN3, raw, reasoning="ok", calls=[("get_weather", '{"city": "Par')], truncated=True)
    # Cut before its name was written: nothing of it shows.
    assert parse(QWEN3, '<tool_call>\n{"na', truncated=True).content == ""


def test_the_fallback_is_hermes() -> None:
    assert isinstance(for_template("{{ messages }}"), HermesFormat)
