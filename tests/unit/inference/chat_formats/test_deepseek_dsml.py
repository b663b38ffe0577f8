"""DeepSeek V3.2 and V4: DSML calls and `<think>` reasoning; llama.cpp's tests/test-chat.cpp cases for
these templates as vectors (the continuation cases, which render a prefilled message, are the engine's)."""

from __future__ import annotations

import pytest

from services.inference.chat_formats import for_template
from services.inference.chat_formats.deepseek_dsml import DeepSeekDsmlFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import TOOLS, check, parse

DSML = DeepSeekDsmlFormat("")
FILES = ("deepseek-ai-DeepSeek-V3.2.jinja", "deepseek-ai-DeepSeek-V4.jinja", "deepseek-ai-DeepSeek-V4-Flash-0731.jinja")
MORE = TOOLS + ("magic_int", "amount", "toggle", "set_config")
ASSIST = "Hello, world!\nWhat's up?"


def block(kind: str, *invokes: tuple[str, list[tuple[str, bool, str]]]) -> str:
    out = f"<｜DSML｜{kind}>\n"
    for name, parameters in invokes:
        out += f'<｜DSML｜invoke name="{name}">\n'
        for key, string, value in parameters:
            out += f'<｜DSML｜parameter name="{key}" string="{str(string).lower()}">{value}</｜DSML｜parameter>\n'
        out += "</｜DSML｜invoke>\n"
    return out + f"</｜DSML｜{kind}>"


def cases(kind: str) -> list[tuple[str, bool, str, str, list]]:
    """(raw, thinking_open, reasoning, content, calls), as test-chat.cpp has them for both versions."""
    city = lambda name, value: (name, [("city", True, value)])  # noqa: E731
    arg1 = ("special_function", [("arg1", False, "1")])
    return [
        (ASSIST, False, "", ASSIST, []),
        ("I'm\nthinking</think>" + ASSIST, True, "I'm\nthinking", ASSIST, []),
        ("Let me check the time</think>\n\n" + block(kind, city("get_time", "Tokyo")), True, "Let me check the time", "",
         [("get_time", {"city": "Tokyo"})]),
        (block(kind, arg1), False, "", "", [("special_function", {"arg1": 1})]),
        ("Calling both</think>\n\n" + block(kind, city("get_time", "Paris"), city("get_weather", "Paris")), True,
         "Calling both", "", [("get_time", {"city": "Paris"}), ("get_weather", {"city": "Paris"})]),
        ("Thinking about it</think>Let me call the function.\n\n" + block(kind, arg1), True, "Thinking about it",
         "Let me call the function.", [("special_function", {"arg1": 1})]),
        ("Multi-arg call</think>\n\n" + block(kind, ("magic_int", [("ref", False, "42"), ("name", True, "foo bar")])),
         True, "Multi-arg call", "", [("magic_int", {"ref": 42, "name": "foo bar"})]),
    ]


V32_ONLY = [
    ("Test negative</think>\n\n" + block("function_calls", ("magic_int", [("ref", False, "-14")])), True,
     "Test negative", "", [("magic_int", {"ref": -14})]),
    ("Test decimal</think>\n\n" + block("function_calls", ("amount", [("orig", False, "3.14")])), True,
     "Test decimal", "", [("amount", {"orig": 3.14})]),
    ("Test boolean</think>\n\n" + block("function_calls", ("toggle", [("enabled", False, "true")])), True,
     "Test boolean", "", [("toggle", {"enabled": True})]),
    ("Test array</think>\n\n" + block("function_calls", ("todo_list", [("todos", False, '["buy milk","walk dog"]')])),
     True, "Test array", "", [("todo_list", {"todos": ["buy milk", "walk dog"]})]),
    ("Test object</think>\n\n" + block("function_calls", ("set_config", [("config", False, '{"theme":"dark","level":2}')])),
     True, "Test object", "", [("set_config", {"config": {"theme": "dark", "level": 2}})]),
    ("</think>\n\n" + block("function_calls", ("get_time", [("city", True, "XYZCITY")])), True, "", "",
     [("get_time", {"city": "XYZCITY"})]),
]
V4_ONLY = [
    # No `</think>`: the call ends the block.
    ("Let me check the time\n\n" + block("tool_calls", ("get_time", [("city", True, "Tokyo")])), True,
     "Let me check the time", "", [("get_time", {"city": "Tokyo"})]),
    # V4 Flash: the blanks before the block are the block's.
    ("\n\n" + block("tool_calls", ("special_function", [("arg1", False, "1")])), False, "", "",
     [("special_function", {"arg1": 1})]),
]


@pytest.mark.parametrize(("raw", "thinking_open", "reasoning", "content", "calls"),
                         cases("function_calls") + cases("tool_calls") + V32_ONLY + V4_ONLY)
def test_llama_cpp_cases(raw: str, thinking_open: bool, reasoning: str, content: str, calls: list) -> None:
    check(DSML, raw, thinking_open=thinking_open, reasoning=reasoning, content=content, calls=calls, tools=MORE)


def test_a_string_value_that_reads_as_json_stays_a_string() -> None:
    raw = block("tool_calls", ("get_time", [("city", True, "42")]))
    check(DSML, raw, calls=[("get_time", {"city": "42"})])


def test_unknown_tools_blanks_and_cut_calls() -> None:
    raw = block("tool_calls", ("get_time", [("city", True, "Paris")]))
    check(DSML, "x\n\n" + raw, tools=["python"], content="x" + raw)
    check(DSML, "a  b\n", content="a  b\n")
    check(DSML, raw[:raw.index("Paris")], truncated=True, calls=[("get_time", "")])
    assert parse(DSML, raw[:20], truncated=True).content == ""


def test_hermes_tags_too() -> None:
    raw = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>'
    check(DSML, "ok</think>" + raw, thinking_open=True, reasoning="ok", calls=[("get_time", {"city": "Paris"})])


@pytest.mark.parametrize("name", FILES)
def test_the_real_templates_are_dsml(name: str) -> None:
    assert isinstance(for_template(template(name)), DeepSeekDsmlFormat)


def test_no_other_template_is_dsml() -> None:
    assert sorted(n for n in template_names() if DeepSeekDsmlFormat.matches(template(n))) == sorted(FILES)
