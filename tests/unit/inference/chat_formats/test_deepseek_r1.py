"""DeepSeek R1 (the distills on Llama and Qwen, llama.cpp's R1 template): `<think>` reasoning opened by
the prompt, calls in DeepSeek's fenced markup; llama.cpp's tests/test-chat.cpp cases for these
templates as vectors (the continuation cases, which render a prefilled message, are the engine's)."""

from __future__ import annotations

import pytest

from services.inference.chat_formats import for_template
from services.inference.chat_formats.deepseek_r1 import DeepSeekR1Format
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

R1 = DeepSeekR1Format("")
FILES = ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
         "llama-cpp-deepseek-r1.jinja")
CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n"
        "```json\n{\"arg1\": 1}```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
ASSIST = "Hello, world!\nWhat's up?"


def test_reasoning_from_the_prompts_open_block() -> None:
    check(R1, "</think>" + ASSIST, thinking_open=True, content=ASSIST)
    check(R1, "I'm\nthinking</think>" + ASSIST, thinking_open=True, reasoning="I'm\nthinking", content=ASSIST)


def test_a_call_after_the_reasoning_and_without_it() -> None:
    check(R1, "</think>" + CALL, thinking_open=True, calls=[("special_function", {"arg1": 1})])
    check(R1, CALL, calls=[("special_function", {"arg1": 1})])  # enable_thinking false: the prompt closed it


def test_the_templates_own_shape_and_several_calls_after_content() -> None:
    # As the templates render past calls: a newline before the closing fence, a newline between calls.
    one = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"
    raw = ("I'll check.<｜tool▁calls▁begin｜>" + one.format(name="get_time", args='{"city": "Paris"}') + "\n"
           + one.format(name="get_weather", args='{"city": "Paris"}') + "<｜tool▁calls▁end｜>")
    check(R1, "ok</think>" + raw, thinking_open=True, reasoning="ok", content="I'll check.",
          calls=[("get_time", {"city": "Paris"}), ("get_weather", {"city": "Paris"})])


def test_an_unknown_tool_stays_content() -> None:
    check(R1, CALL, tools=["python"], content=CALL)


def test_a_call_cut_short_is_a_call_with_the_arguments_so_far() -> None:
    raw = CALL[:CALL.index('1}')]
    check(R1, raw, truncated=True, calls=[("special_function", '{"arg1": ')])
    assert parse(R1, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>func", truncated=True).content == ""


def test_hermes_tags_too() -> None:
    raw = 'x</think><tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
    check(R1, raw, thinking_open=True, reasoning="x", calls=[("special_function", {"arg1": 1})])


def test_template_messages_follow_what_each_template_reads() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "python", "arguments": {"code": "1"}}}
    messages = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    llama = DeepSeekR1Format(template(FILES[0])).template_messages(messages)[0]
    assert llama["content"] is None and llama["tool_calls"][0]["function"]["arguments"] == '{"code": "1"}'
    qwen = DeepSeekR1Format(template(FILES[1])).template_messages(messages)[0]
    assert qwen["tool_calls"][0]["function"]["arguments"] == {"code": "1"}


@pytest.mark.parametrize("name", FILES)
def test_the_real_templates_are_r1(name: str) -> None:
    fmt = for_template(template(name))
    assert isinstance(fmt, DeepSeekR1Format)
    assert fmt.native_tools == (name == "llama-cpp-deepseek-r1.jinja")  # the distills don't render tools


def test_no_other_template_is_r1() -> None:
    claimed = [n for n in template_names() if DeepSeekR1Format.matches(template(n))]
    assert sorted(claimed) == sorted(FILES)
