"""Built-in conversation formats for models without a chat template: each renders a chat as its
models were trained (written out by hand here), says where the answer ends, refuses tools, and is
chosen by the catalogue's params.chat_format or, without one, from the model's architecture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.core.errors import InvalidArgument
from services.core.structured import Tool, make_structure
from services.inference.chat_formats.conversation import FORMATS, default_format, named
from services.inference.models.chat_template import ChatTemplate, TemplateError, model_template
from tests.unit.inference.chat_formats.harness import check

CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"}]


def render(name: str, messages=CHAT, eos: str = "<eos>", add_generation_prompt: bool = True) -> str:
    return model_template({"chat_format": name}, None, None, eos_token=eos).render(messages, add_generation_prompt)


def test_dialogpt_joins_the_turns_with_the_end_of_text_token() -> None:
    assert render("dialogpt", eos="<|endoftext|>") == \
        "Be kind.<|endoftext|>Hi!<|endoftext|>Hello.<|endoftext|>How are you?<|endoftext|>"


def test_transcript_writes_user_and_assistant_lines_and_stops_at_the_next_user_line() -> None:
    assert render("transcript") == "Be kind.\n\nUser: Hi!\nAssistant: Hello.\nUser: How are you?\nAssistant:"
    assert render("transcript", add_generation_prompt=False).endswith("User: How are you?\n")
    assert named("transcript").stop == ("\nUser:",)


def test_blenderbot_separates_turns_with_two_spaces_and_ends_with_eos() -> None:
    assert render("blenderbot", eos="</s>") == "Be kind.   Hi!  Hello.   How are you?</s>"
    assert render("blenderbot", CHAT[1:2], eos="</s>") == " Hi!</s>"


def test_t5_asks_one_question_as_it_is_and_a_conversation_as_a_transcript() -> None:
    assert render("t5", CHAT[1:2], eos="</s>") == "Hi!</s>"
    assert render("t5", CHAT[:2], eos="</s>") == "Be kind.\n\nHi!</s>"
    assert render("t5", eos="</s>") == "Be kind.\n\nUser: Hi!\nAssistant: Hello.\nUser: How are you?\nAssistant:</s>"


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_is_said_by_name_and_refuses_tools(name: str) -> None:
    template = model_template({"chat_format": name}, None, None)
    assert template.format.name == name and not template.native_tools
    tools = make_structure([Tool("get_weather", "", '{"type": "object"}')])
    with pytest.raises(InvalidArgument, match=f"tools: model 'm' chats in the {name} format"):
        template.format.check(tools, "m")
    template.format.check(make_structure([Tool("get_weather", "", '{"type": "object"}')], tool_choice="none"), "m")


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_blanks_around_the_answer_are_not_content_at_every_split(name: str) -> None:
    fmt = named(name)
    check(fmt, " hello there\n  ", tools=(), content="hello there")
    check(fmt, "\n a\n\nb \n", tools=(), content="a\n\nb")


def test_the_catalogue_setting_wins_over_the_models_own_template_and_a_template_file_over_both() -> None:
    own = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert model_template({}, own, named("dialogpt")).format.name == "hermes"  # its own template (the generic format)
    assert model_template({"chat_format": "transcript"}, own, None).format.name == "transcript"
    given = model_template({"chat_format": "transcript", "chat_template": own}, None, None)
    assert given.render(CHAT[1:2]) == "[Hi!]"
    assert model_template({}, None, named("t5")).format.name == "t5"  # the default chosen from the model
    assert model_template({}, None, None).source == ChatTemplate(None).source  # llama.cpp's last resort: ChatML


def test_an_unknown_format_stops_the_load_naming_the_choices() -> None:
    with pytest.raises(TemplateError, match="'chatml2' is not a built-in format; one of dialogpt, transcript"):
        model_template({"chat_format": "chatml2"}, None, None)


@pytest.mark.parametrize(("model_type", "encoder_decoder", "chosen"), [
    ("gpt2", False, "dialogpt"), ("bloom", False, "transcript"), ("llama", False, "transcript"),
    ("blenderbot", True, "blenderbot"), ("blenderbot-small", True, "blenderbot"), ("t5", True, "t5"),
    ("mt5", True, "t5"), ("bart", True, "blenderbot"),
])
def test_the_default_format_comes_from_the_architecture(model_type: str, encoder_decoder: bool, chosen: str) -> None:
    assert default_format(SimpleNamespace(model_type=model_type, is_encoder_decoder=encoder_decoder)).name == chosen
