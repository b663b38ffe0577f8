"""Mistral's `[TOOL_CALLS]` formats (Nemo's JSON list, Small 3.2's `[CALL_ID]`, Devstral's and
Ministral's `name[ARGS]{…}`) and Ministral's `[THINK]` block, with llama.cpp's tests/test-chat.cpp
cases for Mistral's templates as vectors."""

from __future__ import annotations

import re

import pytest

from services.core.structured import ToolCall
from services.inference.chat_formats import for_template
from services.inference.chat_formats.mistral import MistralFormat, mistral_id
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check
from tests.unit.inference.chat_formats.rendering import CALL, call_and_result, render

NEMO, SMALL, DEVSTRAL = ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "Mistral-Small-3.2-24B-Instruct-2506.jinja",
                         "unsloth-mistral-Devstral-Small-2507.jinja")
MINISTRAL = "mistralai-Ministral-3-14B-Reasoning-2512.jinja"
TEMPLATES = (NEMO, SMALL, DEVSTRAL, MINISTRAL)
ASSIST = "Hello, world!\nWhat's up?"
ARG1 = ("special_function", {"arg1": 1})
WITH_OPT = ("special_function", "special_function_with_opt")


def mistral(name: str) -> MistralFormat:
    return MistralFormat(template(name))


def test_their_templates_are_mistral_and_no_other_is() -> None:
    for name in template_names():
        assert isinstance(for_template(template(name)), MistralFormat) == (name in TEMPLATES), name


@pytest.mark.parametrize("name", TEMPLATES)
def test_an_answer_stays_content(name: str) -> None:
    check(mistral(name), ASSIST, content=ASSIST)
    check(mistral(name), "world!\nWhat's up?", content="world!\nWhat's up?")  # a prefilled answer's continuation


def test_nemo_calls_keep_the_ids_written() -> None:
    raw = '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]'
    check(mistral(NEMO), raw, calls=[ARG1], ids=["123456789"])
    two = ('[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "aaaaaaaa1"}, '
           '{"name": "get_time", "arguments": {}, "id": "aaaaaaaa2"}]')
    check(mistral(NEMO), two, calls=[ARG1, ("get_time", {})], ids=["aaaaaaaa1", "aaaaaaaa2"])


def test_small_32_calls_keep_their_call_ids() -> None:
    check(mistral(SMALL), '[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}', calls=[ARG1],
          ids=["123456789"])
    raw = ('[TOOL_CALLS]special_function[CALL_ID]000000001[ARGS]{"arg1": 1}'
           '[TOOL_CALLS]special_function_with_opt[CALL_ID]000000002[ARGS]{"arg1": 1, "arg2": 2}')
    check(mistral(SMALL), raw, tools=WITH_OPT, ids=["000000001", "000000002"],
          calls=[ARG1, ("special_function_with_opt", {"arg1": 1, "arg2": 2})])


def test_devstral_calls_after_content() -> None:
    check(mistral(DEVSTRAL), '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}', calls=[ARG1])
    check(mistral(DEVSTRAL), ASSIST + '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}', content=ASSIST, calls=[ARG1])


def test_ministral_reasons_then_calls() -> None:
    fmt = mistral(MINISTRAL)
    check(fmt, "[THINK]I'm\nthinking[/THINK]" + ASSIST, reasoning="I'm\nthinking", content=ASSIST)
    check(fmt, '[TOOL_CALLS]special_function[ARGS]{"arg1":1}', calls=[ARG1])
    check(fmt, "[THINK]I'm\nthinking[/THINK]" '[TOOL_CALLS]special_function[ARGS]{"arg1":1}', reasoning="I'm\nthinking",
          calls=[ARG1])
    check(fmt, '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}'
          '[TOOL_CALLS]special_function_with_opt[ARGS]{"arg1": 1, "arg2": 2}', tools=WITH_OPT,
          calls=[ARG1, ("special_function_with_opt", {"arg1": 1, "arg2": 2})])
    # A call's markup inside the reasoning is reasoning.
    check(fmt, '[THINK]Let me think about [TOOL_CALLS]special_function[ARGS]{"arg1":1} and more[/THINK]'
          '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}',
          reasoning='Let me think about [TOOL_CALLS]special_function[ARGS]{"arg1":1} and more', calls=[ARG1])
    # Continuing a prefilled reasoning block.
    check(fmt, " thinking[/THINK]" + ASSIST, thinking_open=True, reasoning="thinking", content=ASSIST)


def test_what_is_no_call_of_an_offered_tool_is_content() -> None:
    for raw in ('[TOOL_CALLS]unknown[ARGS]{"a": 1}', '[TOOL_CALLS]special_function[ARGS]"text"',
                '[TOOL_CALLS][{"name": "unknown", "arguments": {}, "id": "123456789"}]', "[TOOL_CALLS] no call\nhere"):
        check(mistral(DEVSTRAL), raw, content=raw)


def test_hermes_tags_too() -> None:
    raw = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
    check(mistral(MINISTRAL), "[THINK]ok[/THINK]" + raw, reasoning="ok", calls=[ARG1])


def test_a_call_cut_short_is_a_call_with_what_was_written() -> None:
    check(mistral(SMALL), '[TOOL_CALLS]get_weather[CALL_ID]123456789[ARGS]{"city": "Pa', truncated=True,
          calls=[("get_weather", '{"city": "Pa')], ids=["123456789"])
    check(mistral(NEMO), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa', truncated=True,
          calls=[("get_weather", '{"city": "Pa')])
    check(mistral(DEVSTRAL), "[TOOL_CALLS]get_wea", truncated=True)  # nothing named yet: nothing shows


def test_ids_become_nine_letters_or_digits_the_same_for_a_call_and_its_result() -> None:
    assert mistral_id("123456789") == "123456789"
    assert re.fullmatch(r"[A-Za-z0-9]{9}", mistral_id(CALL.id)) and mistral_id(CALL.id) == mistral_id(CALL.id)
    second = ToolCall("call_second", "special_function", '{"arg1": 2}')
    for name in (NEMO, SMALL):  # their templates raise on ids of another length
        prompt = render(mistral(name), call_and_result(CALL, second))
        assert prompt.count(mistral_id(CALL.id)) == 2 and prompt.count(mistral_id(second.id)) == 2, prompt
    for name in (DEVSTRAL, MINISTRAL):
        assert '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}' in render(mistral(name), call_and_result())
