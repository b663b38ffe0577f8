"""DeepSeek V3.1: `<think>` reasoning (the generation prompt opens it when thinking, or writes an empty
block), and calls in DeepSeek's markup with the name before the separator and bare JSON after it:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>name<｜tool▁sep｜>{"arg": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The call parser is R1's (deepseek_r1), which reads both shapes.
"""

from __future__ import annotations

import re

from services.inference.chat_formats.base import ChatFormat
from services.inference.chat_formats.deepseek_r1 import CALLS_BEGIN, SEP, DeepSeekCallParser


class DeepSeekV3Format(ChatFormat):
    name = "deepseek-v3.1"
    thinking = ("<think>", "</think>")

    @classmethod
    def matches(cls, template: str) -> bool:
        return CALLS_BEGIN in template and re.search(r"\['name'\]\s*\+\s*'" + SEP, template) is not None

    def call_parser(self, names: frozenset[str]) -> DeepSeekCallParser:
        return DeepSeekCallParser(names)
