"""MeetKai's Functionary, both of its Llama 3.1 formats:
- v3.1: `<function=name>{…}</function>`, and code for `python` after `<|python_tag|>`;
- v3.2: the generation prompt ends with `>>>`, so every answer starts with a recipient line:
  `all\\n` then content, or a tool's name then its arguments; the next part opens with `>>>` again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from services.core.structured import Structure
from services.inference.chat_formats.base import ChatFormat, OutputParser
from services.inference.chat_formats.llama3 import PythonTagCallParser
from services.inference.chat_formats.json_markup import MAX_HEAD, JsonMarkupCallParser, State

FUNCTION, END_FUNCTION = "<function=", "</function>"
RECIPIENT = ">>>"


class FunctionaryV31CallParser(PythonTagCallParser):
    markers = (FUNCTION,) + PythonTagCallParser.markers

    def _opened(self, marker: str) -> State:
        return self._function_name if marker == FUNCTION else super()._opened(marker)

    def _function_name(self) -> bool:
        at = self._pending.find(">")
        if at == -1:
            return False if len(self._pending) < MAX_HEAD and "\n" not in self._pending else self._not_a_call()
        name = self._take(at + 1)[:-1]
        if name not in self.names:
            return self._not_a_call()
        self._state = self._read_arguments(name, self._function_end)
        return True

    def _function_end(self) -> bool:
        return self._expect(END_FUNCTION)


class FunctionaryV32CallParser(JsonMarkupCallParser):
    markers = (RECIPIENT,)

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(names)
        self._state = self._recipient  # the prompt wrote the first ">>>"

    def _opened(self, marker: str) -> State:
        return self._recipient if marker == RECIPIENT else super()._opened(marker)

    def _recipient(self) -> bool:
        line, newline, _ = self._pending.partition("\n")
        if not newline:
            if any(r.startswith(line) for r in self.names | {"all"}):
                return False
            return self._not_a_call()
        recipient = line.strip()
        if recipient == "all":
            self._take(len(line) + 1)
            self._raw, self._strip, self._state = "", False, self._content
        elif recipient in self.names:
            self._take(len(line) + 1)
            self._state = self._read_arguments(recipient, self._content)
        else:
            return self._not_a_call()
        return True

    def _end(self, truncated: bool) -> None:
        if self._state == self._recipient and self._pending.strip() == "all":
            return  # an empty answer to the user
        super()._end(truncated)


class FunctionaryV31Format(ChatFormat):
    name = "functionary-v3.1"

    @classmethod
    def matches(cls, template: str) -> bool:
        return "<|start_header_id|>" in template and FUNCTION in template and END_FUNCTION in template

    def call_parser(self, names: frozenset[str]) -> FunctionaryV31CallParser:
        return FunctionaryV31CallParser(names)


class FunctionaryV32Format(ChatFormat):
    name = "functionary-v3.2"

    @classmethod
    def matches(cls, template: str) -> bool:
        # As llama.cpp's common/chat.cpp detects it.
        return ">>>all" in template and ">>>${recipient}" in template

    def call_parser(self, names: frozenset[str]) -> FunctionaryV32CallParser:
        return FunctionaryV32CallParser(names)

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        # The recipient line opens every answer, tools or not: the call parser always reads it.
        names = frozenset(t.name for t in structure.tools) if structure.calls_tools else frozenset()
        return OutputParser(None, self.call_parser(names))

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The template appends a call's arguments to text: they must be a JSON text."""
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [_arguments_as_text(c) for c in m["tool_calls"]]
            out.append(m)
        return out


def _arguments_as_text(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call["function"])
    if not isinstance(function.get("arguments"), str):
        function["arguments"] = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
    return dict(call, function=function)
