"""DeepSeek V3.2 and V4: `<think>` reasoning (a call also ends a block the prompt opened) and calls in
DSML markup, the block named `function_calls` (V3.2) or `tool_calls` (V4):

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="f">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

`string="false"` values are JSON. The blanks before the block belong to it, not to the content.
"""

from __future__ import annotations

import json

from services.core.structured import Structure
from services.inference.chat_formats.base import ChatFormat, OutputParser
from services.inference.chat_formats.markup import DONE, TEXT, CallEndsReasoning, MarkupCallParser
from services.inference.chat_formats.qwen3_coder import parameter_value

DSML = "｜DSML｜"
BLOCKS = ("function_calls", "tool_calls")
INVOKE, INVOKE_END = f'<{DSML}invoke name="', f"</{DSML}invoke>"
PARAMETER, PARAMETER_END = f'<{DSML}parameter name="', f"</{DSML}parameter>"


class DsmlCallParser(MarkupCallParser):
    openers = tuple(f"<{DSML}{block}>" for block in BLOCKS)
    blanks_before_markup = False

    def _open(self, opener: str) -> None:
        self._state = "section"  # section | name | parameters | key | attributes | value
        self._block_end = "</" + opener[1:]

    def _read(self) -> str | None:
        while True:
            state = self._state
            if state in ("section", "parameters") and not self._skip_blanks():
                return None
            if state == "section":
                invoke = self._literal(INVOKE)
                if invoke:
                    self._state = "name"
                    continue
                end = self._literal(self._block_end)
                if end:
                    return DONE
                return None if invoke is None or end is None else TEXT
            if state == "name":
                name = self._until('">')
                if name is None:
                    return None
                if not self._begin(name):
                    return TEXT
                self._written, self._state = 0, "parameters"
            elif state == "parameters":
                parameter = self._literal(PARAMETER)
                if parameter:
                    self._state = "key"
                    continue
                end = self._literal(INVOKE_END)
                if end:
                    self._stream("}" if self._written else "{}")
                    self._end_call()
                    self._state = "section"
                    continue
                if parameter is None or end is None:
                    return None
                self._call = None
                return TEXT
            elif state == "key":
                key = self._until('"')
                if key is None:
                    return None
                self._key, self._state = key, "attributes"
            elif state == "attributes":
                attributes = self._until(">")
                if attributes is None:
                    return None
                self._string, self._state = 'string="false"' not in attributes, "value"
            else:  # value
                value = self._until(PARAMETER_END)
                if value is None:
                    return None
                value = value if self._string else parameter_value(value)
                pair = json.dumps(self._key, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)
                self._stream(("{" if not self._written else ", ") + pair)
                self._written += 1
                self._state = "parameters"


class DeepSeekDsmlFormat(ChatFormat):
    name = "deepseek-dsml"
    thinking = ("<think>", "</think>")

    @classmethod
    def matches(cls, template: str) -> bool:
        return "dsml_token" in template and "DSML" in template and any(block in template for block in BLOCKS)

    def call_parser(self, names: frozenset[str]) -> DsmlCallParser:
        return DsmlCallParser(names)

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        parser = super().parser(structure, thinking_open)
        if parser.call_parser is not None:
            parser.reasoning = CallEndsReasoning(*self.thinking, thinking_open, DsmlCallParser.openers)
        return parser
