"""Qwen3-Coder's XML calls (and Qwen3.5's, with its `<think>` block), with llama.cpp's
tests/test-chat.cpp cases for these templates as vectors (the continuation cases, which render a
prefilled message, are the engine's; reasoning_format "none" cases have no counterpart in Parley)."""

from __future__ import annotations

import pytest

from services.inference.chat_formats import for_template
from services.inference.chat_formats.hermes import HermesFormat
from services.inference.chat_formats.qwen3_coder import Qwen3CoderFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import TOOLS, check, parse

CODER = Qwen3CoderFormat("{% if tools %}<tool_call><function=<parameter={% endif %}")
QWEN35 = Qwen3CoderFormat("{% if tools %}<tool_call><function=<parameter={% endif %}<think>")
MORE = TOOLS + ("special_function_with_opt", "tool_2req_4opt", "tool_2req_5opt", "set_nullable_str",
                "set_nullable_str_nf", "set_nullable_int", "set_union", "set_unit", "run_in_terminal",
                "empty_args", "empty_args_no_props")
ASSIST = "Hello, world!\nWhat's up?"
FAMILY = ("Qwen3-Coder.jinja", "Qwen3.5-4B.jinja", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", "StepFun3.5-Flash.jinja")


def xml(name: str, *parameters: tuple[str, str], open_: bool = True) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters)
    return ("<tool_call>\n" if open_ else "") + f"<function={name}>\n{body}</function>\n</tool_call>"


ARG1 = xml("special_function", ("arg1", "1"))
WITH_OPT = xml("special_function_with_opt", ("arg1", "1"), ("arg2", "2"))
TWO = [("special_function", {"arg1": 1}), ("special_function_with_opt", {"arg1": 1, "arg2": 2})]

CODER_CASES = [
    (ARG1, [("special_function", {"arg1": 1})]),
    (xml("special_function", ("arg1", "1"), open_=False), [("special_function", {"arg1": 1})]),
    (xml("special_function", ("arg1", "1"), open_=False) + "\n" + WITH_OPT, TWO),
    (ARG1 + "\n" + WITH_OPT, TWO),
    (xml("python", ("code", 'def hello():\n    print("Hello, world!")\n\nhello()')),
     [("python", {"code": 'def hello():\n    print("Hello, world!")\n\nhello()'})]),
    (xml("python", ("code", "格")), [("python", {"code": "格"})]),
    (xml("html", ("markup", "<html>\n <head>\n  <title>Hello!</title>\n </head>\n</html>")),
     [("html", {"markup": "<html>\n <head>\n  <title>Hello!</title>\n </head>\n</html>"})]),
    (xml("todo_list", ("todos", '[{"item": "Check stuff", "selected": false}, {"item": "Prepare stuff", "selected": true}]')),
     [("todo_list", {"todos": [{"item": "Check stuff", "selected": False}, {"item": "Prepare stuff", "selected": True}]})]),
    (xml("edit", ("newString", "#include"), ("filename", "foo.c"), ("oldString", "#iclunde")),
     [("edit", {"newString": "#include", "filename": "foo.c", "oldString": "#iclunde"})]),
    (xml("tool_2req_4opt", ("req2", "42"), ("req1", "hello"), ("opt2", "200")),
     [("tool_2req_4opt", {"req2": 42, "req1": "hello", "opt2": 200})]),
    (xml("tool_2req_4opt", ("req1", "hello"), ("req2", "42"), ("opt4", "100"), ("opt2", "200")),
     [("tool_2req_4opt", {"req1": "hello", "req2": 42, "opt4": 100, "opt2": 200})]),
    (xml("tool_2req_5opt", ("req1", "world"), ("req2", "7"), ("opt5", "last"), ("opt3", "middle"), ("opt1", "first")),
     [("tool_2req_5opt", {"req1": "world", "req2": 7, "opt5": "last", "opt3": "middle", "opt1": "first"})]),
    (xml("tool_2req_5opt", ("req1", "test"), ("req2", "99"), ("opt3", "c"), ("opt1", "a"), ("opt5", "e"),
         ("opt4", "4"), ("opt2", "2")),
     [("tool_2req_5opt", {"req1": "test", "req2": 99, "opt3": "c", "opt1": "a", "opt5": "e", "opt4": 4, "opt2": 2})]),
    (xml("set_nullable_str", ("name", "hello world")), [("set_nullable_str", {"name": "hello world"})]),
    (xml("set_nullable_str_nf", ("name", "hello world")), [("set_nullable_str_nf", {"name": "hello world"})]),
    (xml("set_nullable_int", ("count", "42")), [("set_nullable_int", {"count": 42})]),
    (xml("set_nullable_str", ("name", "null")), [("set_nullable_str", {"name": None})]),
    (xml("set_union", ("value", '{"a": 1}'), ("amount", "2 dollars")),
     [("set_union", {"value": {"a": 1}, "amount": "2 dollars"})]),
    (xml("set_union", ("value", "{not valid json"), ("amount", "42")),
     [("set_union", {"value": "{not valid json", "amount": 42})]),
    (xml("set_unit", ("unit", "celsius")), [("set_unit", {"unit": "celsius"})]),
]


def test_content() -> None:
    check(CODER, ASSIST, content=ASSIST)


@pytest.mark.parametrize(("raw", "calls"), CODER_CASES)
def test_qwen3_coder_calls(raw: str, calls: list) -> None:
    check(CODER, raw, calls=calls, tools=MORE)


def test_content_before_a_call_without_its_opening_tag() -> None:
    raw = "Let me call it.\n" + xml("special_function", ("arg1", "1"), open_=False)
    check(CODER, raw, content="Let me call it.\n", calls=[("special_function", {"arg1": 1})])


PWD = xml("run_in_terminal", ("command", "pwd"))
QWEN35_CASES = [
    # (raw, thinking_open, reasoning, content, calls)
    ("I'm\nthinking\n</think>\n\n" + ASSIST, True, "I'm\nthinking", ASSIST, []),
    (ARG1, False, "", "", [("special_function", {"arg1": 1})]),
    ("I'm\nthinking\n</think>\n\n" + ARG1, True, "I'm\nthinking", "", [("special_function", {"arg1": 1})]),
    (ARG1 + "\n" + WITH_OPT, False, "", "", TWO),
    (xml("python", ("code", 'def hello():\n    print("Hello, world!")\n\nhello()')), False, "", "",
     [("python", {"code": 'def hello():\n    print("Hello, world!")\n\nhello()'})]),
    (xml("edit", ("filename", "foo.c"), ("oldString", "#iclunde"), ("newString", "#include")), False, "", "",
     [("edit", {"filename": "foo.c", "oldString": "#iclunde", "newString": "#include"})]),
    # A value ending in a newline keeps it.
    (xml("edit", ("filename", "foo.c"), ("oldString", "#iclunde"), ("newString", "#include\n")), False, "", "",
     [("edit", {"filename": "foo.c", "oldString": "#iclunde", "newString": "#include\n"})]),
    (xml("python", ("code", '    print("Hello, world!")')), False, "", "",
     [("python", {"code": '    print("Hello, world!")'})]),
    ('I need to output the invoice details in JSON\n</think>\n\n{"amount": 123.45, "date": "2025-12-03"}', True,
     "I need to output the invoice details in JSON", '{"amount": 123.45, "date": "2025-12-03"}', []),
    # A call ends the block the prompt opened, with or without `</think>`.
    (PWD, True, "", "", [("run_in_terminal", {"command": "pwd"})]),
    ("Need to inspect the current directory.\n" + PWD, True, "Need to inspect the current directory.", "",
     [("run_in_terminal", {"command": "pwd"})]),
    ("<tool_call>\n<function=empty_args>\n</function>\n</tool_call>", False, "", "", [("empty_args", {})]),
    ("<tool_call>\n<function=empty_args_no_props>\n</function>\n</tool_call>", False, "", "",
     [("empty_args_no_props", {})]),
    # llama.cpp: reasoning "<think>\n\n" (it keeps the trailing blanks, Parley's splitter does not).
    ("<think>\n\n</think>\n\n" + ARG1, True, "<think>", "", [("special_function", {"arg1": 1})]),
    ("</think>\n\n" + ARG1, True, "", "", [("special_function", {"arg1": 1})]),
    ("</think>\n\n" + PWD, True, "", "", [("run_in_terminal", {"command": "pwd"})]),
    ("</think>\n\nLet me inspect the current directory.\n" + PWD, True, "", "Let me inspect the current directory.\n",
     [("run_in_terminal", {"command": "pwd"})]),
    ("I should inspect the directory.\n</think>\n\nLet me inspect it now.\n" + PWD, True,
     "I should inspect the directory.", "Let me inspect it now.\n", [("run_in_terminal", {"command": "pwd"})]),
    ("I need to run a terminal command.\n</think>\n\n" + PWD, True, "I need to run a terminal command.", "",
     [("run_in_terminal", {"command": "pwd"})]),
    ("I need to run a terminal command.\n</think>\n\nLet me inspect the current directory.\n" + PWD, True,
     "I need to run a terminal command.", "Let me inspect the current directory.\n",
     [("run_in_terminal", {"command": "pwd"})]),
]


@pytest.mark.parametrize(("raw", "thinking_open", "reasoning", "content", "calls"), QWEN35_CASES)
def test_qwen35(raw: str, thinking_open: bool, reasoning: str, content: str, calls: list) -> None:
    check(QWEN35, raw, thinking_open=thinking_open, reasoning=reasoning, content=content, calls=calls, tools=MORE)


def test_hermes_json_inside_the_same_tags() -> None:
    raw = 'Sure.<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>\n' + WITH_OPT
    check(CODER, raw, content="Sure.", calls=TWO, tools=MORE)


def test_an_unknown_tool_stays_content() -> None:
    check(CODER, ARG1, tools=["python"], content=ARG1)


def test_a_call_cut_short_keeps_its_closed_parameters() -> None:
    raw = xml("edit", ("filename", "foo.c"), ("oldString", "#icl"))
    check(CODER, raw[:raw.index("#icl")], truncated=True, calls=[("edit", '{"filename": "foo.c"')])
    check(CODER, "<tool_call>\n<function=edit>\n<param", truncated=True, calls=[("edit", "")])
    assert parse(CODER, "<tool_call>\n<functi", truncated=True).content == ""


def test_without_tools_the_reasoning_ends_only_at_its_marker() -> None:
    check(QWEN35, "a <tool_call> b</think>c", tools=(), thinking_open=True, reasoning="a <tool_call> b", content="c")


@pytest.mark.parametrize("name", FAMILY)
def test_the_real_templates_are_this_family(name: str) -> None:
    fmt = for_template(template(name))
    assert isinstance(fmt, Qwen3CoderFormat) and fmt.native_tools
    assert (fmt.thinking is not None) == (name != "Qwen3-Coder.jinja")


def test_no_other_template_is_this_family() -> None:
    assert sorted(n for n in template_names() if Qwen3CoderFormat.matches(template(n))) == sorted(FAMILY)
    assert isinstance(for_template(template("Qwen-Qwen3-0.6B.jinja")), HermesFormat)
