"""Phi-3.5 (content only; llama.cpp's test-chat.cpp has no case for it) and Phi-4-mini's JSON-list calls."""

from __future__ import annotations

from services.inference.chat_formats import for_template
from services.inference.chat_formats.phi import PhiFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

PHI = PhiFormat("<|user|><|assistant|><|end|><|tool|>")


def test_the_real_template_is_phi_and_no_other_is() -> None:
    for name in template_names():
        claimed = isinstance(for_template(template(name)), PhiFormat)
        assert claimed == (name == "microsoft-Phi-3.5-mini-instruct.jinja"), name
    assert not for_template(template("microsoft-Phi-3.5-mini-instruct.jinja")).native_tools


def test_content() -> None:
    check(PHI, "Hello, world!\nWhat's up?", content="Hello, world!\nWhat's up?")
    check(PHI, "a <|tool_cal", content="a <|tool_cal")


def test_phi4_call_lists() -> None:
    raw = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'
    check(PHI, raw, calls=[("get_weather", {"city": "Paris"})])
    raw = ('Let me look.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
           '{"name": "get_time", "arguments": {}}]<|/tool_call|>')
    check(PHI, raw, content="Let me look.", calls=[("get_weather", {"city": "Paris"}), ("get_time", {})])


def test_a_tool_not_offered_stays_content() -> None:
    raw = '<|tool_call|>[{"name": "launch", "arguments": {}}]<|/tool_call|>'
    check(PHI, raw, content=raw)


def test_a_call_cut_short_is_a_call_with_its_arguments_so_far() -> None:
    raw = '<|tool_call|>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Pa'
    check(PHI, raw, truncated=True, calls=[("get_time", {}), ("get_weather", '{"city": "Pa')])
    assert parse(PHI, '<|tool_call|>[{"na', truncated=True).content == ""


def test_hermes_tags_are_calls_too() -> None:
    check(PHI, '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>',
          calls=[("get_time", {"city": "Paris"})])
