"""Kimi K2 (Instruct, Thinking): calls in special-token sections with the model's own ids, with
llama.cpp's tests/test-chat.cpp cases for these templates as vectors."""

from __future__ import annotations

from services.inference.chat_formats import for_template
from services.inference.chat_formats.kimi import KimiFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

KIMI_FILES = ("Kimi-K2-Instruct.jinja", "Kimi-K2-Thinking.jinja", "moonshotai-Kimi-K2.jinja")
THINKING = KimiFormat("<|tool_calls_section_begin|><|tool_call_begin|><think>")
INSTRUCT = KimiFormat("<|tool_calls_section_begin|><|tool_call_begin|>")
ASSIST = "Hello, world!\nWhat's up?"


def call(name: str, arguments: str, index: int = 0) -> str:
    return f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"


def section(*calls: str) -> str:
    return "<|tool_calls_section_begin|>" + "".join(calls) + "<|tool_calls_section_end|>"


def test_the_real_templates_are_kimi_and_no_other_is() -> None:
    for name in template_names():
        claimed = isinstance(for_template(template(name)), KimiFormat)
        assert claimed == (name in KIMI_FILES), name
    assert for_template(template("Kimi-K2-Thinking.jinja")).thinking == ("<think>", "</think>")


def test_content_and_single_calls_with_the_models_ids() -> None:
    for fmt in (THINKING, INSTRUCT):
        check(fmt, ASSIST, content=ASSIST)
        raw = section(call("special_function", '{"arg1": 1}'))
        check(fmt, raw, calls=[("special_function", {"arg1": 1})], ids=["functions.special_function:0"])
        check(fmt, ASSIST + raw, content=ASSIST, calls=[("special_function", {"arg1": 1})])
    check(THINKING, "<think>I'm thinking about this</think>" + section(call("special_function", '{"arg1": 1}')),
          reasoning="I'm thinking about this", calls=[("special_function", {"arg1": 1})])
    check(THINKING, section(call("empty_args", "{}")), tools=["empty_args"], calls=[("empty_args", {})])
    code = '{"code": "def hello():\\n    print(\\"Hello, world!\\")\\n\\nhello()"}'
    check(THINKING, section(call("python", code)), calls=[("python", code)])


def test_parallel_calls_keep_their_ids() -> None:
    raw = section(call("special_function", '{"arg1": 1}'), call("special_function_with_opt", '{"arg1": 1, "arg2": 2}', 1))
    check(THINKING, raw, tools=["special_function", "special_function_with_opt"],
          calls=[("special_function", {"arg1": 1}), ("special_function_with_opt", {"arg1": 1, "arg2": 2})],
          ids=["functions.special_function:0", "functions.special_function_with_opt:1"])
    raw = "<think>I need to call two functions</think>" + section(
        call("special_function", '{"arg1": 1}'), call("python", '{"code": "print(\'hey\')"}', 1))
    check(THINKING, raw, reasoning="I need to call two functions",
          calls=[("special_function", {"arg1": 1}), ("python", {"code": "print('hey')"})])
    raw = section(call("special_function", '{"arg1": 1}'), call("python", '{"code": "print(1)"}', 1),
                  call("html", '{"markup": "<p>test</p>"}', 2))
    check(THINKING, raw, calls=[("special_function", {"arg1": 1}), ("python", {"code": "print(1)"}),
                                ("html", {"markup": "<p>test</p>"})],
          ids=["functions.special_function:0", "functions.python:1", "functions.html:2"])


def test_calls_inside_the_thinking_block_end_it() -> None:
    calls = [("special_function", {"arg1": 1}), ("python", {"code": "print('hey')"})]
    raw = "<think>I need to call two functions" + section(
        call("special_function", '{"arg1": 1}'), call("python", '{"code": "print(\'hey\')"}', 1))
    check(THINKING, raw, reasoning="I need to call two functions", calls=calls)
    # Without section or end markers.
    raw = ("<think>I need to call two functions"
           '<|tool_call_begin|>functions.special_function:0<|tool_call_argument_begin|>{"arg1": 1}'
           '<|tool_call_begin|>functions.python:1<|tool_call_argument_begin|>{"code": "print(\'hey\')"}')
    check(THINKING, raw, reasoning="I need to call two functions", calls=calls)
    raw = ('<|tool_call_begin|>functions.execute_command:0<|tool_call_argument_begin|>{"command": "ls -lah", '
           '"cwd": "/home/user/development/exllamav3", "timeout": 10}')
    check(THINKING, raw, tools=["execute_command"],
          calls=[("execute_command", {"command": "ls -lah", "cwd": "/home/user/development/exllamav3", "timeout": 10})])


def test_a_call_cut_short_is_a_call_with_its_arguments_so_far() -> None:
    raw = "<|tool_calls_section_begin|><|tool_call_begin|>functions.special_function:0<|tool_call_argument_begin|>{\"arg1\": "
    check(THINKING, raw, truncated=True, calls=[("special_function", '{"arg1": ')])
    # Cut before the arguments: nothing of it shows.
    assert parse(THINKING, "<|tool_calls_section_begin|><|tool_call_begin|>functions.spe", truncated=True).content == ""


def test_a_tool_not_offered_stays_content() -> None:
    raw = call("unknown_tool", '{"a": 1}')
    check(INSTRUCT, "Hi " + raw, content="Hi " + raw)


def test_hermes_tags_are_calls_too() -> None:
    raw = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    check(THINKING, raw, content="Sure.", calls=[("get_weather", {"city": "Paris"})])
    raw = section(call("special_function", '{"arg1": 1}')) + \
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    check(INSTRUCT, raw, calls=[("special_function", {"arg1": 1}), ("get_time", {})])
