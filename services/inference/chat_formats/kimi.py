"""Moonshot Kimi K2 (Instruct, Thinking): calls in a section of special tokens,
`<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{…}<|tool_call_end|>
<|tool_calls_section_end|>`, the id as written (`functions.NAME:0`); K2 Thinking reasons in a
`<think>` block and may write its calls inside it, which ends the block.
"""

from __future__ import annotations

import json
import re

from services.core.structured import Structure, ToolCall
from services.inference.chat_formats.base import ChatFormat, OutputParser, ReasoningSplitter, partial_suffix
from services.inference.chat_formats.blocks import BlockCallParser
from services.inference.models.grammars import CallDelta

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENTS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
CALL_ID = re.compile(r"\s*((?:functions\.)?([^\s:<]+):\d+)\s*")
# What ends a call's arguments: its end marker, or (the model may leave it out) the next call or the
# end of the section.
ARGUMENT_ENDS = (CALL_END, CALL_BEGIN, SECTION_END, SECTION_BEGIN)


class KimiCallParser(BlockCallParser):
    """The section markers are structure and vanish; each call is a block from `<|tool_call_begin|>`."""

    opens = (SECTION_BEGIN, SECTION_END, CALL_BEGIN)

    def begin(self, opener: str) -> None:
        self._id: str | None = None  # known once the call's head is read
        self._name = ""  # "" while unknown, or when not among the tools (the call stays text)
        self._sent = 0  # how much of the arguments has been streamed

    def read(self, block: str, end: bool, truncated: bool) -> int | None:
        if self._opener != CALL_BEGIN:
            return 0
        head_end = block.find(ARGUMENTS)
        if self._id is None:
            if head_end == -1:
                return self._give_up(block, end, truncated)
            head = CALL_ID.fullmatch(block[:head_end])
            self._id = head.group(1) if head else ""
            self._name = head.group(2) if head and head.group(2) in self.names else ""
            if self._name:
                self.delta(CallDelta(len(self.calls), self._id, self._name))
        start = head_end + len(ARGUMENTS)
        ends = [(block.find(m, start), m) for m in ARGUMENT_ENDS if m in block[start:]]
        stop, marker = min(ends) if ends else (len(block), "")
        if not ends and not end:
            stop -= max(partial_suffix(block, m) for m in ARGUMENT_ENDS)
        took = stop + len(marker) if marker == CALL_END else stop
        if not self._name:
            return self._give_up(block, end, truncated, took if ends else None)
        if stop > start + self._sent:
            self.delta(CallDelta(len(self.calls), arguments=block[start + self._sent:stop]))
            self._sent = stop - start
        if not ends and not end:
            return None
        arguments = block[start:stop]
        if ends or truncated or _is_json(arguments):
            self.call(ToolCall(self._id, self._name, arguments))
        else:  # the answer ended in the middle of the arguments: not a call
            self.text(CALL_BEGIN + block)
        return took

    def _give_up(self, block: str, end: bool, truncated: bool, took: int | None = None) -> int | None:
        """Not a call to an offered tool: its markup is content once its end is known (cut short
        by max_tokens, it vanishes, as a call cut short before its name does)."""
        if end and took is None:
            if truncated:
                return len(block)
            took = len(block)
        if took is not None:
            self.text(CALL_BEGIN + block[:took])
        return took


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class KimiFormat(ChatFormat):
    name = "kimi-k2"

    def __init__(self, template: str = "") -> None:
        super().__init__(template)
        self.thinking = ("<think>", "</think>") if "<think>" in template else None

    @classmethod
    def matches(cls, template: str) -> bool:
        return SECTION_BEGIN in template and CALL_BEGIN in template

    def call_parser(self, names: frozenset[str]) -> KimiCallParser:
        return KimiCallParser(names)

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        out = super().parser(structure, thinking_open)
        if self.thinking:  # a call inside the block ends it
            out.reasoning = ReasoningSplitter(*self.thinking, open_=thinking_open,
                                              answer_starts=(SECTION_BEGIN, CALL_BEGIN))
        return out
