"""Command R7B and Cohere2 MoE: thinking markers, content markers, JSON action lists with the model's
ids; llama.cpp's tests/test-chat.cpp cases for these templates as vectors (its reasoning_format "none"
cases, which keep the markers in the content, have no counterpart in Parley)."""

from __future__ import annotations

import pytest

from services.inference.chat_formats import for_template
from services.inference.chat_formats.command_r7b import CommandR7BFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

R7B = CommandR7BFormat("")
FILES = ("CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", "Cohere2MoE.jinja")
ASSIST = "Hello, world!\nWhat's up?"
THOUGHTS = "<|START_THINKING|>I'm\nthinking<|END_THINKING|>"
ACTION = ('<|START_ACTION|>[\n'
          '    {"tool_call_id": "0", "tool_name": "special_function", "parameters": {"arg1": 1}}\n'
          ']<|END_ACTION|>')
CALL = [("special_function", {"arg1": 1})]


def test_r7b_content_and_reasoning() -> None:
    check(R7B, f"<|START_RESPONSE|>{ASSIST}<|END_RESPONSE|>", content=ASSIST)
    check(R7B, f"{THOUGHTS}<|START_RESPONSE|>{ASSIST}<|END_RESPONSE|>", reasoning="I'm\nthinking", content=ASSIST)
    check(R7B, f"{THOUGHTS}<|START_RESPONSE|>{ASSIST}<|END_RESPONSE|>", tools=(), reasoning="I'm\nthinking",
          content=ASSIST)


def test_r7b_calls_keep_the_models_ids() -> None:
    check(R7B, THOUGHTS + ACTION, reasoning="I'm\nthinking", calls=CALL, ids=["0"])
    check(R7B, "<|START_THINKING|><|END_THINKING|>" + ACTION, calls=CALL, ids=["0"])


def test_a_call_cut_short_after_its_name_is_a_call() -> None:
    raw = THOUGHTS + '<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "special_function", '
    check(R7B, raw, truncated=True, reasoning="I'm\nthinking", calls=[("special_function", "")], ids=["0"])
    check(R7B, ACTION[:ACTION.index("1}}")], truncated=True, calls=[("special_function", '{"arg1": ')], ids=["0"])
    assert parse(R7B, '<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_n', truncated=True).content == ""


# Cohere2 MoE: the prompt opens the thinking block.
MOE_CASES = [
    (f"I'm\nthinking<|END_THINKING|><|START_TEXT|>{ASSIST}<|END_TEXT|>", "I'm\nthinking", ASSIST, [], []),
    (f"<|END_THINKING|><|START_TEXT|>{ASSIST}<|END_TEXT|>", "", ASSIST, [], []),
    ('I need to output the invoice details in JSON<|END_THINKING|>'
     '<|START_TEXT|>{"amount": 123.45, "date": "2025-12-03"}<|END_TEXT|>',
     "I need to output the invoice details in JSON", '{"amount": 123.45, "date": "2025-12-03"}', [], []),
    ("I'm\nthinking<|END_THINKING|>" + ACTION, "I'm\nthinking", "", CALL, ["0"]),
    ("<|END_THINKING|>" + ACTION, "", "", CALL, ["0"]),
    ('<|END_THINKING|><|START_ACTION|>[\n'
     '    {"tool_call_id": "0", "tool_name": "todo_list", "parameters": {"todos": ["buy milk", "walk dog"]}}\n'
     ']<|END_ACTION|>', "", "", [("todo_list", {"todos": ["buy milk", "walk dog"]})], ["0"]),
    ("I'm\nthinking<|END_THINKING|><|START_ACTION|>[\n"
     '    {"tool_call_id": "0", "tool_name": "special_function", "parameters": {"arg1": 1}},\n'
     '    {"tool_call_id": "1", "tool_name": "python", "parameters": {"code": "print(\'hey\')"}}\n'
     ']<|END_ACTION|>', "I'm\nthinking", "", CALL + [("python", {"code": "print('hey')"})], ["0", "1"]),
]


@pytest.mark.parametrize(("raw", "reasoning", "content", "calls", "ids"), MOE_CASES)
def test_cohere2_moe(raw: str, reasoning: str, content: str, calls: list, ids: list) -> None:
    check(R7B, raw, thinking_open=True, reasoning=reasoning, content=content, calls=calls, ids=ids)


def test_cohere2_moe_partial_call() -> None:
    raw = "I'm\nthinking<|END_THINKING|><|START_ACTION|>[\n" '    {"tool_call_id": "0", "tool_name": "special_function", '
    check(R7B, raw, thinking_open=True, truncated=True, reasoning="I'm\nthinking", calls=[("special_function", "")])


def test_fields_in_another_order_and_unknown_tools() -> None:
    raw = '<|START_ACTION|>[{"parameters": {"arg1": 1}, "tool_name": "special_function", "tool_call_id": "7"}]<|END_ACTION|>'
    check(R7B, raw, calls=CALL, ids=["7"])
    check(R7B, ACTION, tools=["python"], content=ACTION)


def test_hermes_tags_too() -> None:
    raw = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
    check(R7B, "<|START_THINKING|>x<|END_THINKING|>" + raw, reasoning="x", calls=CALL)


@pytest.mark.parametrize("name", FILES)
def test_the_real_templates_are_this_family(name: str) -> None:
    assert isinstance(for_template(template(name)), CommandR7BFormat)


def test_no_other_template_is_this_family() -> None:
    assert sorted(n for n in template_names() if CommandR7BFormat.matches(template(n))) == sorted(FILES)
