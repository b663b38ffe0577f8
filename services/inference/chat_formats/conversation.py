"""Built-in conversation formats, for models that carry no chat template: the conversational models
of transformers' early days, joined as each was trained.

- `dialogpt`: the turns joined by the end-of-text token, the answer written until the model's next
  one (DialoGPT; transformers' own default for GPT-2 tokenizers before templates were per model).
- `transcript`: `User: …` / `Assistant: …` lines, the answer ending where the model starts the next
  `User:` line (any causal LM: Bloom, GPT-2, Pythia).
- `blenderbot`: the turns separated by two spaces, the user's after a space, then the end-of-text
  token (BlenderBot and BlenderBot-small; transformers' default for their tokenizers).
- `t5`: one question as it is, a conversation as a transcript (Flan-T5 follows instructions; its
  decoder writes the answer).

The catalogue names one with `params.chat_format`; without it, `default_format` picks one from the
model's architecture. These formats have no tool-call syntax and no reasoning block: a request that
offers tools is refused. A format is one object here and one line in FORMATS.
"""

from __future__ import annotations

from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import Structure
from services.inference.chat_formats.base import ChatFormat, OutputParser, Parsed


class ConversationFormat(ChatFormat):
    """A format for a model without a chat template: its Jinja `source`, and where the answer ends."""

    source = ""
    stop: tuple[str, ...] = ()  # text that ends the answer (the model writing the next turn)
    own_parser = True  # the blanks around the answer (after "Assistant:") are not content

    def __init__(self, template: str = "") -> None:
        super().__init__(template or self.source)

    @property
    def native_tools(self) -> bool:
        return False

    def check(self, structure: Structure, model_id: str) -> None:
        if structure.calls_tools:
            raise InvalidArgument(f"tools: model {model_id!r} chats in the {self.name} format, which has no tool "
                                  "calls; send the request without tools (or tool_choice \"none\")")

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        return Trimmed()


class Trimmed(OutputParser):
    """The answer as written, less the blanks around it (after "Assistant:", before the end):
    trailing blanks are held back until more text follows them."""

    def __init__(self) -> None:
        super().__init__(None, None)
        self._begun = False
        self._blanks = ""

    def feed(self, text: str) -> Parsed:
        if not self._begun:
            text = text.lstrip()
            self._begun = bool(text)
        text = self._blanks + text
        kept = text.rstrip()
        self._blanks = text[len(kept):]
        return Parsed(content=kept)

    def finish(self, truncated: bool = False) -> Parsed:
        self._blanks = ""
        return Parsed()


class DialoGptFormat(ConversationFormat):
    name = "dialogpt"
    source = "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}"


class TranscriptFormat(ConversationFormat):
    name = "transcript"
    source = (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
        "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n"
        "{% else %}User: {{ message['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}")
    stop = ("\nUser:",)


class BlenderBotFormat(ConversationFormat):
    name = "blenderbot"
    source = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ ' ' }}{% endif %}{{ message['content'] }}"
        "{% if not loop.last %}{{ '  ' }}{% endif %}{% endfor %}{{ eos_token }}")


class T5Format(ConversationFormat):
    name = "t5"
    source = (
        "{% set turns = messages | rejectattr('role', 'equalto', 'system') | list %}"
        "{% for message in messages if message['role'] == 'system' %}{{ message['content'] }}\n\n{% endfor %}"
        "{% if turns | length == 1 %}{{ turns[0]['content'] }}{% else %}{% for message in turns %}"
        "{{ 'Assistant' if message['role'] == 'assistant' else 'User' }}: {{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}{% endif %}{{ eos_token }}")


FORMATS: dict[str, type[ConversationFormat]] = {
    f.name: f for f in (DialoGptFormat, TranscriptFormat, BlenderBotFormat, T5Format)}
T5_FAMILY = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}


def named(name: str) -> ConversationFormat:
    """The built-in format called `name` (params.chat_format)."""
    family = FORMATS.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"params.chat_format {name!r} is not a built-in format; one of {', '.join(FORMATS)}")
    return family()


def default_format(config: Any) -> ConversationFormat:
    """The format for a model without a template or setting, from its transformers config: an
    encoder-decoder chats as BlenderBot (T5's family as T5), GPT-2 as DialoGPT, any other causal LM
    in a plain transcript."""
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return T5Format() if model_type in T5_FAMILY else BlenderBotFormat()
    return DialoGptFormat() if model_type == "gpt2" else TranscriptFormat()
