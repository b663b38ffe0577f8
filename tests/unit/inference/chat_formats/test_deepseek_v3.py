"""DeepSeek V3.1: `<think>` reasoning, calls as `name<｜tool▁sep｜>{json}`; llama.cpp's
tests/test-chat.cpp cases for its template as vectors."""

from __future__ import annotations

from services.inference.chat_formats import for_template
from services.inference.chat_formats.deepseek_v3 import DeepSeekV3Format
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

V31 = DeepSeekV3Format("")
FILE = "deepseek-ai-DeepSeek-V3.1.jinja"


def call(name: str, city: str) -> str:
    return f'<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{{"city": "{city}"}}<｜tool▁call▁end｜>'


def calls(*written: str) -> str:
    return "<｜tool▁calls▁begin｜>" + "".join(written) + "<｜tool▁calls▁end｜>"


def test_a_call_without_thinking() -> None:
    check(V31, calls(call("get_time", "XYZCITY")), calls=[("get_time", {"city": "XYZCITY"})])


def test_reasoning_then_a_call() -> None:
    check(V31, "REASONING</think>" + calls(call("get_time", "Tokyo")), thinking_open=True,
          reasoning="REASONING", calls=[("get_time", {"city": "Tokyo"})])


def test_reasoning_content_and_several_calls() -> None:
    raw = "REASONING</think>CONTENT" + calls(call("get_time", "Paris"), call("get_weather", "Paris"))
    check(V31, raw, thinking_open=True, reasoning="REASONING", content="CONTENT",
          calls=[("get_time", {"city": "Paris"}), ("get_weather", {"city": "Paris"})])


def test_reasoning_and_content() -> None:
    # llama.cpp keeps the newline before `</think>` in the reasoning ("REASONING\n"); Parley's splitter
    # leaves the reasoning's trailing blanks out, in every family.
    check(V31, "REASONING</think>\nCONTENT", thinking_open=True, reasoning="REASONING", content="CONTENT")
    check(V31, "CONTENT", content="CONTENT")


def test_an_unknown_tool_stays_content_and_a_cut_call_is_a_call() -> None:
    raw = calls(call("get_time", "Paris"))
    check(V31, raw, tools=["python"], content=raw)
    check(V31, raw[:raw.index("Par")], truncated=True, calls=[("get_time", '{"city": "')])
    assert parse(V31, raw[:25], truncated=True).content == ""


def test_hermes_tags_too() -> None:
    raw = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>'
    check(V31, raw, calls=[("get_time", {"city": "Paris"})])


def test_the_real_template_is_v31_and_no_other() -> None:
    assert isinstance(for_template(template(FILE)), DeepSeekV3Format)
    assert [n for n in template_names() if DeepSeekV3Format.matches(template(n))] == [FILE]
