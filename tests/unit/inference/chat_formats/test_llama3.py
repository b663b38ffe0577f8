"""Llama 3.1 / 3.2 / 3.3: JSON calls that open the answer and builtin tools after `<|python_tag|>`,
with llama.cpp's tests/test-chat.cpp cases for Meta's templates as vectors."""

from __future__ import annotations

import pytest

from services.core.structured import Tool, ToolCall, make_structure
from services.inference.chat_formats import for_template
from services.inference.chat_formats.llama3 import Llama3Format
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check
from tests.unit.inference.chat_formats.rendering import CALL, call_and_result, render

TEMPLATES = ("meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja",
             "meta-llama-Llama-3.3-70B-Instruct.jinja")
ASSIST = "Hello, world!\nWhat's up?"
CALL_RAW = '{"name": "special_function", "parameters": {"arg1": 1}}'


def llama(name: str = TEMPLATES[0]) -> Llama3Format:
    return Llama3Format(template(name))


def test_metas_templates_are_llama3_and_no_other_is() -> None:
    for name in template_names():
        assert isinstance(for_template(template(name)), Llama3Format) == (name in TEMPLATES), name


@pytest.mark.parametrize("name", TEMPLATES)
def test_an_answer_stays_content(name: str) -> None:
    # test-chat.cpp: message_assist with a tool offered, and the continuation of a prefilled answer.
    check(llama(name), ASSIST, content=ASSIST)
    check(llama(name), "world!\nWhat's up?", content="world!\nWhat's up?")


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_json_call_opens_the_answer(name: str) -> None:
    check(llama(name), CALL_RAW, calls=[("special_function", {"arg1": 1})])
    check(llama(name), '\n {"name": "special_function", "arguments": {"arg1": 1}}',
          calls=[("special_function", {"arg1": 1})])
    check(llama(name), '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
          calls=[("get_weather", {"city": "Paris"})])


def test_several_calls_separated_by_semicolons_or_lines() -> None:
    second = '{"name": "get_time", "parameters": {"zone": "UTC"}}'
    calls = [("special_function", {"arg1": 1}), ("get_time", {"zone": "UTC"})]
    check(llama(), f"{CALL_RAW}; {second}", calls=calls)
    check(llama(), f"{CALL_RAW}\n{second}\n", calls=calls)


def test_json_that_is_no_call_of_an_offered_tool_is_content() -> None:
    for raw in ('{"name": "unknown_tool", "parameters": {"arg1": 1}}', '{"amount": 123.45}', "{not json} at all",
                '{"name": "special_function", "parameters": "oops"}', "[1, 2]"):
        check(llama(), raw, content=raw)
    # A call of a tool not offered here.
    check(llama(), CALL_RAW, content=CALL_RAW, tools=["get_weather"])
    # JSON after words is an answer, not a call.
    check(llama(), f"Like this: {CALL_RAW}", content=f"Like this: {CALL_RAW}")


def test_builtin_tools_after_the_python_tag() -> None:
    check(llama(), '<|python_tag|>python.call(code="print(\\"hi\\")")', calls=[("python", {"code": 'print("hi")'})])
    check(llama(), '<|python_tag|>brave_search.call(query="weather in Paris", n=3)',
          calls=[("brave_search", {"query": "weather in Paris", "n": 3})], tools=["brave_search"])
    check(llama(), 'Let me look.\n<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
          content="Let me look.", calls=[("get_weather", {"city": "Paris"})])
    # code_interpreter writes the code itself.
    check(llama(), "<|python_tag|>import math\nprint(math.pi)",
          calls=[("python", {"code": "import math\nprint(math.pi)"})])
    # A builtin tool that is not offered: content as written.
    raw = '<|python_tag|>wolfram_alpha.call(query="2+2")'
    check(llama(), raw, content=raw, tools=["get_weather"])


def test_hermes_tags_too() -> None:
    # The tool grammar (tool_choice "required") writes Hermes tags whatever the family.
    raw = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
    check(llama(), raw, calls=[("special_function", {"arg1": 1})])
    check(llama(), ASSIST + "\n" + raw + raw, content=ASSIST,
          calls=[("special_function", {"arg1": 1}), ("special_function", {"arg1": 1})])


def test_a_call_cut_short_is_a_call_with_what_was_written() -> None:
    check(llama(), '{"name": "get_weather", "parameters": {"city": "Par', calls=[("get_weather", '{"city": "Par')],
          truncated=True)
    check(llama(), '<|python_tag|>print(1', calls=[("python", {"code": "print(1"})], truncated=True)
    # Cut before the name: what was written is all there is.
    check(llama(), '{"na', content='{"na', truncated=True)


def test_arguments_stream_as_they_are_written() -> None:
    parser = llama().parser(make_structure([Tool("get_weather")]))
    out = parser.feed('{"name": "get_weather", "parameters": {"city": "Pa')
    assert [(d.name, d.arguments) for d in out.deltas] == [("get_weather", ""), ("", '{"city": "Pa')]
    assert out.content == "" and out.calls == []
    out = parser.feed('ris"}}')
    assert [d.arguments for d in out.deltas] == ['ris"}'] and out.calls[0].arguments == '{"city": "Paris"}'


def test_the_template_renders_several_calls_one_message_each() -> None:
    second = ToolCall("call_second", "get_time", "{}")
    prompt = render(llama(), call_and_result(CALL, second), tools=["special_function", "get_time"])
    assert '{"name": "special_function", "parameters": {"arg1": 1}}' in prompt
    assert '{"name": "get_time", "parameters": {}}' in prompt
