"""FireFunction v2: ` functools[{…}, …]`, with llama.cpp's tests/test-chat.cpp cases for its template
as vectors."""

from __future__ import annotations

from services.inference.chat_formats import for_template
from services.inference.chat_formats.firefunction import FireFunctionFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check

TEMPLATE = "fireworks-ai-llama-3-firefunction-v2.jinja"
ASSIST = "Hello, world!\nWhat's up?"
CALL = '{"name": "special_function", "arguments": {"arg1": 1}}'


def firefunction() -> FireFunctionFormat:
    return FireFunctionFormat(template(TEMPLATE))


def test_its_template_is_firefunction_and_no_other_is() -> None:
    for name in template_names():
        assert isinstance(for_template(template(name)), FireFunctionFormat) == (name == TEMPLATE), name


def test_test_chat_cases() -> None:
    check(firefunction(), ASSIST, content=ASSIST)
    check(firefunction(), f" functools[{CALL}]", calls=[("special_function", {"arg1": 1})])
    check(firefunction(), "world!\nWhat's up?", content="world!\nWhat's up?")  # a prefilled answer's continuation


def test_several_calls_and_content_before_them() -> None:
    raw = f'{ASSIST} functools[{CALL}, {{"name": "get_time", "arguments": {{}}}}]'
    check(firefunction(), raw, content=ASSIST, calls=[("special_function", {"arg1": 1}), ("get_time", {})])


def test_a_tool_not_offered_is_content() -> None:
    raw = ' functools[{"name": "unknown", "arguments": {}}]'
    check(firefunction(), raw, content=raw)
    check(firefunction(), "functools are neat", content="functools are neat")


def test_hermes_tags_too() -> None:
    check(firefunction(), f"<tool_call>{CALL}</tool_call>", calls=[("special_function", {"arg1": 1})])


def test_a_call_cut_short_is_a_call_with_what_was_written() -> None:
    check(firefunction(), ' functools[{"name": "get_weather", "arguments": {"city": "Pa', truncated=True,
          calls=[("get_weather", '{"city": "Pa')])
    # After a complete call the fragment is dropped: the complete calls are the answer.
    check(firefunction(), f' functools[{CALL}, {{"name": "get_weather", "arguments": {{"ci', truncated=True,
          calls=[("special_function", {"arg1": 1})])
    check(firefunction(), " functools[{", truncated=True)  # nothing named yet: nothing shows


def test_the_template_does_not_render_tools() -> None:
    # It reads `functions` (a JSON text), which the engine does not pass: tools go in the system prompt.
    assert not firefunction().native_tools
