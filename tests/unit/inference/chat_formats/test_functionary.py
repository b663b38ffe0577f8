"""Functionary v3.1 (`<function=name>{…}</function>`, `<|python_tag|>` code) and v3.2 (a recipient
line opens each part of the answer), with llama.cpp's tests/test-chat.cpp cases for MeetKai's
templates as vectors."""

from __future__ import annotations

from services.inference.chat_formats import for_template
from services.inference.chat_formats.functionary import FunctionaryV31Format, FunctionaryV32Format
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check
from tests.unit.inference.chat_formats.rendering import call_and_result, render

V31, V32 = "meetkai-functionary-medium-v3.1.jinja", "meetkai-functionary-medium-v3.2.jinja"
ASSIST = "Hello, world!\nWhat's up?"
ARG1 = ("special_function", {"arg1": 1})
HERMES = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'


def v31() -> FunctionaryV31Format:
    return FunctionaryV31Format(template(V31))


def v32() -> FunctionaryV32Format:
    return FunctionaryV32Format(template(V32))


def test_their_templates_are_functionary_and_no_other_is() -> None:
    for name in template_names():
        fmt = for_template(template(name))
        assert isinstance(fmt, FunctionaryV31Format) == (name == V31), name
        assert isinstance(fmt, FunctionaryV32Format) == (name == V32), name


# --- v3.1 ---------------------------------------------------------------------------------------
def test_v31_test_chat_cases() -> None:
    check(v31(), ASSIST, content=ASSIST)
    check(v31(), '<function=special_function>{"arg1": 1}</function>', calls=[ARG1])
    check(v31(), "world!\nWhat's up?", content="world!\nWhat's up?")  # a prefilled answer's continuation


def test_v31_content_then_several_calls() -> None:
    raw = f'{ASSIST}\n<function=special_function>{{"arg1": 1}}</function>\n<function=get_time>{{}}</function>'
    check(v31(), raw, content=ASSIST, calls=[ARG1, ("get_time", {})])


def test_v31_python_code_after_the_python_tag() -> None:
    check(v31(), "<|python_tag|>print(2 + 2)", calls=[("python", {"code": "print(2 + 2)"})])
    # As its template renders past python calls: the arguments' JSON.
    check(v31(), '<|python_tag|>{"code": "print(1)"}', calls=[("python", {"code": "print(1)"})])


def test_v31_what_is_no_call_stays_content() -> None:
    for raw in ('<function=unknown>{"a": 1}</function>', "<function=special_function>not json</function>",
                "a <function= tag\nand more"):
        check(v31(), raw, content=raw)
    check(v31(), "<|python_tag|>print(1)", content="<|python_tag|>print(1)", tools=["get_time"])


def test_v31_hermes_tags_and_calls_cut_short() -> None:
    check(v31(), HERMES, calls=[ARG1])
    check(v31(), '<function=get_weather>{"city": "Pa', calls=[("get_weather", '{"city": "Pa')], truncated=True)
    check(v31(), "<function=get_wea", truncated=True)


def test_v31_the_template_renders_calls() -> None:
    assert '<function=special_function>{"arg1": 1}</function>' in render(v31(), call_and_result())


# --- v3.2 ---------------------------------------------------------------------------------------
def test_v32_test_chat_cases() -> None:
    check(v32(), "all\n" + ASSIST, content=ASSIST, tools=())  # the recipient line goes, tools or not
    check(v32(), 'special_function\n{"arg1": 1}', calls=[ARG1])
    check(v32(), "world!\nWhat's up?", content="world!\nWhat's up?", tools=())


def test_v32_content_then_calls() -> None:
    raw = 'all\nLet me check.\n>>>special_function\n{"arg1": 1}\n>>>get_time\n{}'
    check(v32(), raw, content="Let me check.", calls=[ARG1, ("get_time", {})])
    check(v32(), 'special_function\n{"arg1": 1}>>>all\nDone.', content="Done.", calls=[ARG1])


def test_v32_an_unknown_recipient_is_content() -> None:
    check(v32(), 'unknown\n{"a": 1}', content='unknown\n{"a": 1}')
    check(v32(), "Hello", content="Hello")
    check(v32(), "all", content="")


def test_v32_hermes_tags_and_calls_cut_short() -> None:
    check(v32(), HERMES, calls=[ARG1])
    check(v32(), 'get_weather\n{"city": "Pa', calls=[("get_weather", '{"city": "Pa')], truncated=True)


def test_v32_the_template_renders_calls_with_their_arguments_as_text() -> None:
    prompt = render(v32(), call_and_result())
    assert '>>>special_function\n{"arg1": 1}' in prompt and prompt.endswith(">>>")
