"""Qwen3-Coder's XML calls (also Qwen3.5, Nemotron 3 Nano and StepFun 3.5, as llama.cpp reads them):

    <tool_call>
    <function=name>
    <parameter=key>
    value
    </parameter>
    </function>
    </tool_call>

after a `<think>` block where the template has one (a call also ends a block the prompt opened: the
model may call without closing it). The opening `<tool_call>` may be missing; after it, a JSON body is
a Hermes call. A value is a string unless it reads as JSON (a number, true, null, an object…):
llama.cpp converts by the tool's schema, which the call parser does not get, so a string parameter
whose value reads as JSON ("42") comes back as that JSON value.
"""

from __future__ import annotations

import json
from typing import Any

from services.core.structured import Structure
from services.inference.chat_formats.base import ChatFormat, OutputParser
from services.inference.chat_formats.markup import DONE, TEXT, CallEndsReasoning, MarkupCallParser

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"


def _no_constants(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity are not JSON


def parameter_value(text: str) -> Any:
    """A parameter's value as written between its tags: the newline after the opening tag and the one
    before the closing tag are the markup's."""
    text = text[1:] if text.startswith("\n") else text
    text = text[:-1] if text.endswith("\n") else text
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return text


class XmlCallParser(MarkupCallParser):
    """Qwen3-Coder's calls; each parameter streams as a piece of the JSON arguments once it is closed."""

    openers = (OPEN, FUNCTION)

    def _open(self, opener: str) -> None:
        self._state = "body" if opener == OPEN else "name"  # body | name | parameters | key | value | close
        self._written = 0  # parameters streamed

    def _read(self) -> str | None:
        while True:
            state = self._state
            if state in ("body", "parameters", "close") and not self._skip_blanks():
                return None
            if state == "body":  # after <tool_call>: XML, or a Hermes call's JSON
                function = self._literal(FUNCTION)
                if not function:
                    return None if function is None else TEXT
                self._state = "name"
            elif state == "name":
                name = self._until(">")
                if name is None:
                    return None
                if not self._begin(name.strip()):
                    return TEXT
                self._state = "parameters"
            elif state == "parameters":
                parameter = self._literal(PARAMETER)
                if parameter:
                    self._state = "key"
                    continue
                end = self._literal(FUNCTION_END)
                if end:
                    self._stream("}" if self._written else "{}")
                    self._end_call()
                    self._state = "close"
                    continue
                if parameter is None or end is None:
                    return None
                self._call = None
                return TEXT
            elif state == "key":
                key = self._until(">")
                if key is None:
                    return None
                self._key, self._state = key.strip(), "value"
            elif state == "value":
                value = self._until(PARAMETER_END)
                if value is None:
                    return None
                pair = json.dumps(self._key, ensure_ascii=False) + ": " + json.dumps(
                    parameter_value(value), ensure_ascii=False)
                self._stream(("{" if not self._written else ", ") + pair)
                self._written += 1
                self._state = "parameters"
            else:  # close: the </tool_call> after the call
                return None if self._literal(CLOSE) is None else DONE


class Qwen3CoderFormat(ChatFormat):
    name = "qwen3-coder"

    def __init__(self, template: str = "") -> None:
        super().__init__(template)
        self.thinking = ("<think>", "</think>") if "think>" in template else None

    @classmethod
    def matches(cls, template: str) -> bool:
        # As llama.cpp tells it; the exclusion is a template that writes no newlines between the tags.
        return (OPEN in template and FUNCTION in template and PARAMETER in template
                and "'<tool_call><function=' ~ tool_call.name ~ '>'" not in template)

    def call_parser(self, names: frozenset[str]) -> XmlCallParser:
        return XmlCallParser(names)

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        parser = super().parser(structure, thinking_open)
        if self.thinking and parser.call_parser is not None:
            parser.reasoning = CallEndsReasoning(*self.thinking, thinking_open, XmlCallParser.openers)
        return parser
