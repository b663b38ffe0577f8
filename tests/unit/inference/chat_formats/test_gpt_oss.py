"""gpt-oss (harmony channels), with llama.cpp's tests/test-chat.cpp cases for its template as vectors."""

from __future__ import annotations

import json

from services.inference.chat_formats import for_template
from services.inference.chat_formats.gpt_oss import GptOssFormat
from tests.llama_sdist import template, template_names
from tests.unit.inference.chat_formats.harness import check, parse

GPT_OSS = GptOssFormat("<|channel|><|message|>")
ASSIST = "Hello, world!\nWhat's up?"
THOUGHTS = "<|channel|>analysis<|message|>I'm\nthinking<|end|>"
CALL = [("special_function", {"arg1": 1})]


def test_the_real_template_is_gpt_oss_and_no_other_is() -> None:
    for name in template_names():
        assert isinstance(for_template(template(name)), GptOssFormat) == (name == "openai-gpt-oss-120b.jinja"), name


def test_final_and_commentary_messages_are_content() -> None:
    check(GPT_OSS, "<|channel|>final<|message|>" + ASSIST, content=ASSIST)
    check(GPT_OSS, "<|channel|>commentary<|message|>" + ASSIST, content=ASSIST)
    check(GPT_OSS, "<|channel|>final<|message|>" + ASSIST + "<|return|>", content=ASSIST)


def test_analysis_is_reasoning() -> None:
    check(GPT_OSS, THOUGHTS + "<|start|>assistant<|channel|>final<|message|>" + ASSIST,
          reasoning="I'm\nthinking", content=ASSIST)
    check(GPT_OSS, "<|channel|>analysis<|message|>I'm\nthinking", reasoning="I'm\nthinking")
    # A stray "commentary to=assistant" header before the real one.
    check(GPT_OSS, "<|channel|>commentary to=assistant" + THOUGHTS + "<|start|>assistant<|channel|>final<|message|>"
          + ASSIST, reasoning="I'm\nthinking", content=ASSIST)
    check(GPT_OSS, THOUGHTS + "<|start|>assistant<|channel|>commentary to=assistant<|channel|>final<|message|>"
          + ASSIST, reasoning="I'm\nthinking", content=ASSIST)


def test_calls_with_the_recipient_in_either_header() -> None:
    for raw in (' to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}',
                '<|channel|>analysis to=functions.special_function<|message|>{"arg1": 1}',
                ' to=functions.special_function<|channel|>analysis <|constrain|>json<|message|>{"arg1": 1}',
                '<|channel|>commentary to=functions.special_function<|message|>{"arg1": 1}',
                '<|channel|>commentary to=functions.special_function <|constrain|>json<|message|>{"arg1": 1}<|call|>'):
        check(GPT_OSS, raw, calls=CALL)
    check(GPT_OSS, THOUGHTS + '<|start|>assistant to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}',
          reasoning="I'm\nthinking", calls=CALL)


def test_complex_arguments_and_structured_output() -> None:
    arguments = '{"oldString": "if (part < railCount - 1) {", "newString": "if (part < 4) {", "replaceAll": false}'
    check(GPT_OSS, "<|channel|>analysis<|message|>Thinking about edit...<|end|><|start|>assistant<|channel|>commentary"
          " to=functions.edit <|constrain|>json<|message|>" + arguments,
          reasoning="Thinking about edit...", calls=[("edit", json.loads(arguments))])
    invoice = '{"amount": 123.45, "date": "2025-12-03"}'
    check(GPT_OSS, "<|channel|>analysis<|message|>I need to output the invoice details in JSON<|end|>"
          "<|start|>assistant<|channel|>final <|constrain|>json<|message|>" + invoice,
          reasoning="I need to output the invoice details in JSON", content=invoice)


def test_unsolicited_and_unknown_calls_are_dropped() -> None:
    # As llama-server: a message to a built-in tool or a function not offered has no OpenAI shape.
    check(GPT_OSS, "<|channel|>analysis<|message|>I will execute python to say hello<|end|>"
          "<|start|>assistant to=container.exec<|channel|>commentary<|message|>python3 -c 'print(\"hello\")'",
          reasoning="I will execute python to say hello")
    check(GPT_OSS, "<|channel|>analysis<|message|>I will execute python to say hello<|end|>"
          "<|start|>assistant<|channel|>commentary to=python <|constrain|>code<|message|>print(\"hello\")",
          reasoning="I will execute python to say hello")
    check(GPT_OSS, '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Paris"}<|call|>',
          tools=["get_time"])


def test_continuations_and_bare_answers_are_content() -> None:
    check(GPT_OSS, "world!\nWhat's up?", content="world!\nWhat's up?")
    check(GPT_OSS, "to be or not", content="to be or not")
    check(GPT_OSS, " thinking<|end|><|start|>assistant<|channel|>final<|message|>" + ASSIST, thinking_open=True,
          reasoning=" thinking", content=ASSIST)


def test_a_preamble_then_calls_each_with_an_id() -> None:
    raw = ("<|channel|>commentary<|message|>Let me check.<|end|>"
           '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
           '<|call|><|start|>assistant<|channel|>commentary to=functions.get_time<|message|>{}<|call|>')
    check(GPT_OSS, raw, content="Let me check.", calls=[("get_weather", {"city": "Paris"}), ("get_time", {})])
    assert len(set(parse(GPT_OSS, raw).ids)) == 2


def test_a_call_cut_short_is_a_call_with_its_arguments_so_far() -> None:
    raw = THOUGHTS + '<|start|>assistant<|channel|>commentary to=functions.get_weather<|message|>{"city": "Par'
    check(GPT_OSS, raw, truncated=True, reasoning="I'm\nthinking", calls=[("get_weather", '{"city": "Par')])
    # Cut in its header: nothing of it shows.
    assert parse(GPT_OSS, THOUGHTS + "<|start|>assistant<|channel|>commentary to=func", truncated=True).content == ""


def test_hermes_tags_are_calls_too() -> None:
    # The tool grammar (tool_choice "required") writes Hermes tags right after the prompt's <|start|>assistant.
    check(GPT_OSS, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
          calls=[("get_weather", {"city": "Paris"})])
    check(GPT_OSS, '<|channel|>final<|message|>Sure.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
          content="Sure.", calls=[("get_time", {})])


def test_template_messages_one_call_per_message_with_its_results_and_thinking() -> None:
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Two tools.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "noon"},
    ]
    out = GPT_OSS.template_messages(messages)
    assert [(m["role"], m.get("tool_call_id")) for m in out] == [
        ("user", None), ("assistant", None), ("tool", "a"), ("assistant", None), ("tool", "b")]
    assert out[1]["thinking"] == "Two tools." and out[1]["content"] == ""
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[3]["tool_calls"][0]["function"]["name"] == "get_time"


def test_a_message_to_the_user_is_content() -> None:
    check(GptOssFormat(""), " to=user<|message|>It is sunny.", content="It is sunny.")


def test_an_offered_function_named_without_its_namespace_is_a_call() -> None:
    check(GptOssFormat(""), ' to=get_weather<|channel|>json<|message|>{"city": "Paris"}<|call|>',
          calls=[("get_weather", {"city": "Paris"})], tools=["get_weather"])
    check(GptOssFormat(""), ' to=get_weather<|channel|>json<|message|>{"city": "Paris"}<|', truncated=True,
          calls=[("get_weather", {"city": "Paris"})], tools=["get_weather"])
