"""IBM Granite 3.x: `<think>` reasoning, content that may sit between `<response>` tags, and calls as a
JSON list after a marker, to the end of the answer:

    <|tool_call|>[{"name": "f", "arguments": {"arg": 1}}]

Granite 4 writes Hermes tags (hermes.HermesFormat reads it). The template renders past calls not at
all, so they go into the assistant's content as the model writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.core.structured import Structure
from services.inference.chat_formats.base import ChatFormat, OutputParser
from services.inference.chat_formats.markup import CallListParser

CALLS = "<|tool_call|>"


class GraniteCallParser(CallListParser):
    openers = (CALLS,)
    dropped = ("<response>", "</response>")


class GraniteFormat(ChatFormat):
    name = "granite"
    thinking = ("<think>", "</think>")

    @classmethod
    def matches(cls, template: str) -> bool:
        return CALLS in template and "<|start_of_role|>" in template

    def call_parser(self, names: frozenset[str]) -> GraniteCallParser:
        return GraniteCallParser(names)

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        parser = super().parser(structure, thinking_open)
        if parser.call_parser is None:  # without tools too: the `<response>` tags come off
            parser.call_parser = self.call_parser(frozenset())
        return parser

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for message in messages:
            message = dict(message)
            if calls := message.pop("tool_calls", None):
                written = json.dumps([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                      for c in calls], ensure_ascii=False)
                message["content"] = (message.get("content") or "") + CALLS + written
            out.append(message)
        return out
