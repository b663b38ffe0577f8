"""Cohere's Command R7B and Cohere2 MoE (North Code): reasoning between
`<|START_THINKING|>` and `<|END_THINKING|>` (Cohere2 MoE's prompt opens it), content between
`<|START_RESPONSE|>` (R7B) or `<|START_TEXT|>` (Cohere2 MoE) and its end marker, calls as a JSON list
with the model's own ids:

    <|START_ACTION|>[
        {"tool_call_id": "0", "tool_name": "f", "parameters": {"arg": 1}}
    ]<|END_ACTION|>
"""

from __future__ import annotations

from services.core.structured import Structure
from services.inference.chat_formats.base import ChatFormat, OutputParser
from services.inference.chat_formats.markup import CallListParser

ACTION, END_ACTION = "<|START_ACTION|>", "<|END_ACTION|>"


class ActionParser(CallListParser):
    openers = (ACTION,)
    dropped = ("<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_TEXT|>", "<|END_TEXT|>")
    closer = END_ACTION
    name_key, arguments_key, id_key = "tool_name", "parameters", "tool_call_id"


class CommandR7BFormat(ChatFormat):
    name = "command-r7b"
    thinking = ("<|START_THINKING|>", "<|END_THINKING|>")

    @classmethod
    def matches(cls, template: str) -> bool:
        return ACTION in template and ("<|START_RESPONSE|>" in template or "<|START_TEXT|>" in template)

    def call_parser(self, names: frozenset[str]) -> ActionParser:
        return ActionParser(names)

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        parser = super().parser(structure, thinking_open)
        if parser.call_parser is None:  # without tools too: the content's markers come off
            parser.call_parser = self.call_parser(frozenset())
        return parser
