"""Gemma 2 (content only) and Gemma 4 (thought channel, calls in its own argument syntax), with
llama.cpp's tests/test-chat.cpp cases for these templates as vectors."""

from __future__ import annotations

from services.inference.chat_formats import for_template
from services.inference.chat_formats.gemma import Gemma2Format, Gemma4Format
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

GEMMA4 = Gemma4Format("'<|tool_call>call:'")
GEMMA2 = Gemma2Format("<start_of_turn>")
ASSIST = "Hello, world!\nWhat's up?"
Q = '<|"|>'


def tool_call(name: str, arguments: str) -> str:
    return f"<|tool_call>call:{name}{arguments}<tool_call|>"


def test_the_real_templates_are_gemma_and_no_other_is() -> None:
    for name in template_names():
        fmt = for_template(template(name))
        assert isinstance(fmt, Gemma4Format) == name.startswith("google-gemma-4"), name
        assert isinstance(fmt, Gemma2Format) == (name == "google-gemma-2-2b-it.jinja"), name


def test_gemma2_is_content() -> None:
    check(GEMMA2, "Hello, world!", content="Hello, world!")
    check(GEMMA2, "Line 1\nLine 2\nLine 3", content="Line 1\nLine 2\nLine 3")
    check(GEMMA2, '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', calls=[("get_time", {})])


def test_gemma4_thought_channel() -> None:
    check(GEMMA4, "Hello, world!", content="Hello, world!")
    check(GEMMA4, "<|channel>thought\nI'm\nthinking<channel|>" + ASSIST, reasoning="I'm\nthinking", content=ASSIST)
    check(GEMMA4, "<|channel>thought<channel|>" + ASSIST, content=ASSIST)


def test_gemma4_stray_channel_markers_are_not_content() -> None:
    for raw in ("<|channel>thought\n<channel|>Hello, world!\nWhat's up?<channel|>",
                "<|channel>thought\n<channel|>Hello, world!\nWhat's up?<|channel>thought\n<channel|>",
                "<|channel>thought\n<channel|>Hello, world!\nWhat's up?<|channel>thought\n<channel|><channel|>",
                "<|channel><|channel>thought\n<channel|>Hello, world!\nWhat's up?"):
        check(GEMMA4, raw, content=ASSIST)
        check(GEMMA4, raw, content=ASSIST, tools=())


def test_gemma4_calls() -> None:
    check(GEMMA4, tool_call("get_time", f"{{city:{Q}London{Q}}}"), calls=[("get_time", {"city": "London"})])
    check(GEMMA4, tool_call("get_time", f"{{city:{Q}San Francisco{Q}}}"), calls=[("get_time", {"city": "San Francisco"})])
    check(GEMMA4, tool_call("empty_args", "{}"), tools=["empty_args"], calls=[("empty_args", {})])
    check(GEMMA4, ASSIST + tool_call("get_time", f"{{city:{Q}Paris{Q}}}"), content=ASSIST,
          calls=[("get_time", {"city": "Paris"})])
    check(GEMMA4, "<|channel>thought\nI'm\nthinking<channel|>" + tool_call("get_time", f"{{city:{Q}Paris{Q}}}"),
          reasoning="I'm\nthinking", calls=[("get_time", {"city": "Paris"})])
    check(GEMMA4, tool_call("get_time", f"{{city:{Q}London{Q}}}") + tool_call("get_weather", f"{{city:{Q}Paris{Q}}}"),
          calls=[("get_time", {"city": "London"}), ("get_weather", {"city": "Paris"})])


def test_gemma4_argument_values() -> None:
    cases = [
        ("special_function", "{arg1:42}", {"arg1": 42}),
        ("special_function", "{arg1:-7}", {"arg1": -7}),
        ("amount", "{orig:3.14}", {"orig": 3.14}),
        ("toggle", "{enabled:true}", {"enabled": True}),
        ("toggle", "{enabled:false}", {"enabled": False}),
        ("set_nullable", "{value:null}", {"value": None}),
        ("todo_list", f"{{todos:[{Q}buy milk{Q},{Q}walk dog{Q}]}}", {"todos": ["buy milk", "walk dog"]}),
        ("set_config", f"{{config:{{theme:{Q}dark{Q},count:3}}}}", {"config": {"theme": "dark", "count": 3}}),
        ("todo_list", "{todos:[]}", {"todos": []}),
        ("set_config", "{config:{}}", {"config": {}}),
        ("amount", "{orig:1.5e10}", {"orig": 1.5e10}),
        ("edit", f"{{text:{Q}a, b: {{c}}{Q},{Q}quoted key{Q}:1}}", {"text": "a, b: {c}", "quoted key": 1}),
    ]
    for name, arguments, expected in cases:
        check(GEMMA4, tool_call(name, arguments), tools=[name], calls=[(name, expected)])


def test_gemma4_a_call_cut_short_is_a_call_with_its_arguments_so_far() -> None:
    raw = f"<|tool_call>call:get_time{{city:{Q}Paris{Q},days:[1,2"
    # The arguments' JSON as far as its tokens are complete (the 2 may have been the start of 25).
    check(GEMMA4, raw, truncated=True, calls=[("get_time", '{"city":"Paris","days":[1,')])
    assert parse(GEMMA4, "<|tool_call>call:get_ti", truncated=True).content == ""


def test_gemma4_a_tool_not_offered_stays_content() -> None:
    raw = tool_call("launch", "{code:1}")
    check(GEMMA4, "Sure. " + raw, content="Sure. " + raw)


def test_gemma4_hermes_tags_are_calls_too() -> None:
    check(GEMMA4, '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>',
          calls=[("get_time", {"city": "Paris"})])


def test_gemma4_template_messages() -> None:
    messages = [
        {"role": "user", "content": "Time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": '{"time": "noon"}'},
        {"role": "assistant", "content": "It is noon."},
    ]
    current = Gemma4Format(template("google-gemma-4-31B-it.jinja")).template_messages(messages)
    assert [m["role"] for m in current] == ["user", "assistant", "tool", "assistant"]
    assert current[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    older = Gemma4Format(template("google-gemma-4-31B-it-interleaved.jinja")).template_messages(messages)
    assert [m["role"] for m in older] == ["user", "assistant"]
    assert older[1]["tool_responses"] == [{"name": "get_time", "response": {"time": "noon"}}]
    assert older[1]["content"] == "It is noon."
