"""IBM Granite: 3.3's `<think>`, `<response>` and `<|tool_call|>` lists; 4.0 and 4.1 write Hermes tags.
llama.cpp's tests/test-chat.cpp cases for these templates as vectors (and its commented-out case for
`<response>`, pending there)."""

from __future__ import annotations

import pytest

from services.inference.chat_formats import for_template
from services.inference.chat_formats.granite import GraniteFormat
from services.inference.chat_formats.hermes import HermesFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

GRANITE = GraniteFormat("")
FILE = "ibm-granite-granite-3.3-2B-Instruct.jinja"
ASSIST = "Hello, world!\nWhat's up?"
HERMES_CALL = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
CALL = [("special_function", {"arg1": 1})]


def test_content_and_reasoning() -> None:
    check(GRANITE, ASSIST, content=ASSIST)
    check(GRANITE, f"<think>I'm\nthinking</think>{ASSIST}", reasoning="I'm\nthinking", content=ASSIST)
    check(GRANITE, f"<think>I'm\nthinking</think><response>{ASSIST}</response>", reasoning="I'm\nthinking",
          content=ASSIST)
    check(GRANITE, f"<think>I'm\nthinking</think><response>{ASSIST}</response>", tools=(),
          reasoning="I'm\nthinking", content=ASSIST)


def test_calls() -> None:
    raw = ('<|tool_call|>[{"name": "get_time", "arguments": {"city": "Paris"}}, '
           '{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    check(GRANITE, raw, calls=[("get_time", {"city": "Paris"}), ("get_weather", {"city": "Paris"})])
    check(GRANITE, "<think>ok</think>Checking." + raw, reasoning="ok", content="Checking.",
          calls=[("get_time", {"city": "Paris"}), ("get_weather", {"city": "Paris"})])
    check(GRANITE, HERMES_CALL, calls=CALL)


def test_unknown_tools_and_calls_cut_short() -> None:
    raw = '<|tool_call|>[{"name": "get_time", "arguments": {"city": "Paris"}}]'
    check(GRANITE, raw, tools=["python"], content=raw)
    check(GRANITE, raw[:raw.index("Par")], truncated=True, calls=[("get_time", '{"city": "')])
    assert parse(GRANITE, '<|tool_call|>[{"na', truncated=True).content == ""


def test_past_calls_go_into_the_content() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "python", "arguments": {"code": "1"}}}
    messages = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    assert GraniteFormat().template_messages(messages) == [
        {"role": "assistant", "content": '<|tool_call|>[{"name": "python", "arguments": {"code": "1"}}]'}]


def test_granite_33_is_granite_and_no_other() -> None:
    assert isinstance(for_template(template(FILE)), GraniteFormat)
    assert [n for n in template_names() if GraniteFormat.matches(template(n))] == [FILE]


@pytest.mark.parametrize("name", ["ibm-granite-granite-4.0.jinja", "ibm-granite-granite-4.1.jinja"])
def test_granite_4_is_hermes(name: str) -> None:
    fmt = for_template(template(name))
    assert type(fmt) is HermesFormat and fmt.native_tools
    check(fmt, ASSIST, content=ASSIST)
    check(fmt, HERMES_CALL, calls=CALL)
