"""Every real template in llama.cpp's collection, rendered the way every engine renders chats:
ordinary OpenAI input (a system message, tools, a past call with its arguments, the tool's result)
renders or is a 400 naming the template's rule, never an exception of another kind; a system
message survives in templates without a system role; thinking can be turned off."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.core.structured import Tool, ToolCall, make_structure, make_template_options
from services.inference.models.chat_template import ChatTemplate, fold_system
from services.inference.models.grammars import template_input
from tests.llama_sdist import template, template_names

SYSTEM = "You answer in French."
WEATHER = Tool("get_weather", "Weather of a city", '{"properties":{"city":{"type":"string"}},"type":"object"}')
CALL = ToolCall("call_abcdefghijklmnopqrstuvwx", "get_weather", '{"city": "Paris"}')
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": CALL.id}]
# Templates that need more than OpenAI's chat to render at all (FireFunction reads `functions`, a JSON
# text, and `datetime`): they may refuse with a 400, never fail otherwise.
NEEDS_MORE = {"fireworks-ai-llama-3-firefunction-v2.jinja"}


def chat_template(name: str) -> ChatTemplate:
    return ChatTemplate(template(name), bos_token="<s>", eos_token="</s>")


def test_the_collection_renders_a_system_message_and_a_tool_turn() -> None:
    rendered, refused = [], {}
    for name in template_names():
        t = chat_template(name)
        try:
            plain = t.render(CHAT[:2])
            chat, tools = template_input(CHAT, make_structure([WEATHER]), t.native_tools)
            with_tools = t.render(chat, tools=tools)
        except InvalidArgument as exc:
            refused[name] = exc.message
            continue
        assert SYSTEM in plain, name  # folded into the first user turn where there is no system role
        assert "Paris" in with_tools and "21" in with_tools, name
        rendered.append(name)
    assert set(refused) <= NEEDS_MORE, refused
    assert len(rendered) >= 60


def test_a_template_without_a_system_role_gets_it_in_the_first_user_turn() -> None:
    gemma = chat_template("google-gemma-2-2b-it.jinja")
    assert not gemma.system_role
    assert f"{SYSTEM}\n\nWeather in Paris?" in gemma.render(CHAT[:2])
    assert fold_system([{"role": "system", "content": "a"}]) == [{"role": "user", "content": "a"}]


def test_a_template_that_iterates_tools_renders_a_chat_without_them() -> None:
    # Hermes 3's tool-use template answered a chat without tools with a 500 (tools=None inside it).
    hermes = chat_template("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja")
    assert "Hi" in hermes.render([{"role": "user", "content": "Hi"}])


def test_thinking_is_on_unless_the_request_turns_it_off() -> None:
    qwen3 = chat_template("Qwen-Qwen3-0.6B.jinja")
    chat = [{"role": "user", "content": "Hi"}]
    assert not qwen3.render(chat).rstrip().endswith("</think>")
    for off in (make_template_options({"enable_thinking": False}), make_template_options(None, "none")):
        assert qwen3.render(chat, options=off).rstrip().endswith("</think>")  # an empty block: no thinking
    qwq = chat_template("Qwen-QwQ-32B.jinja")
    assert qwq.thinking_open() and not qwen3.thinking_open()
    off = make_template_options(None, "none")
    assert not qwq.thinking_open(off)  # this QwQ template closes the block itself when told
    # A template that opens the block whatever it is told (the original R1 distills'): thinking off closes it.
    forced = ChatTemplate("{{ messages[0].content }}{% if add_generation_prompt %}<think>\n{% endif %}")
    assert forced.thinking_open() and not forced.thinking_open(off)
    assert forced.render(chat, options=off) == "Hi<think>\n\n</think>\n\n"


def test_the_templates_own_refusal_is_a_400_naming_it() -> None:
    strict = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with "
                          "the user') }}{% endif %}{{ messages[0].content }}")
    with pytest.raises(InvalidArgument, match="must start with the user"):
        strict.render([{"role": "assistant", "content": "x"}])
    broken = ChatTemplate("{% for t in tools %}{{ t }}{% endfor %}{{ messages[0].content.missing.deeper }}")
    with pytest.raises(InvalidArgument, match="chat template"):
        broken.render([{"role": "user", "content": "x"}])
    dividing = ChatTemplate("{{ messages[0].content }}{{ 1 // (messages | length - 1) }}")
    with pytest.raises(InvalidArgument, match="chat template"):
        dividing.render([{"role": "user", "content": "x"}])


def test_template_options_are_checked() -> None:
    for kwargs, effort, message in ((["x"], None, "must be an object"), ({"messages": 1}, None, "cannot be set"),
                                    ({}, "extreme", "reasoning_effort")):
        with pytest.raises(InvalidArgument, match=message):
            make_template_options(kwargs, effort)
    assert make_template_options({"enable_thinking": False}).variables()["enable_thinking"] is False
    assert make_template_options(None, "high").variables() == {"enable_thinking": True, "reasoning_effort": "high"}
