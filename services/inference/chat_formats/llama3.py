"""Llama 3.1, 3.2 and 3.3 (Meta's templates): a call is a JSON object that opens the answer,
`{"name": …, "parameters": {…}}` (or "arguments"; several separated by ";" or new lines), and a
builtin tool's call follows `<|python_tag|>`: `brave_search.call(query="…")`, a JSON call, or code
for `python`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from services.core.structured import ToolCall
from services.inference.chat_formats.base import ChatFormat
from services.inference.chat_formats.json_markup import CALL_HEAD, JsonMarkupCallParser, State, arguments_object, unquote

PYTHON_TAG = "<|python_tag|>"
BUILTIN_CALL = re.compile(r"([A-Za-z_]\w*)\.call\(.*\)", re.S)  # brave_search.call(query="…")


def tagged_call(text: str, names: frozenset[str], truncated: bool) -> tuple[str, str] | None:
    """The call written after `<|python_tag|>` (to the end of the answer): (name, arguments)."""
    text = text.strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        name, arguments = value.get("name"), arguments_object(value.get("parameters", value.get("arguments")))
        if isinstance(name, str) and name in names and arguments is not None:
            return name, json.dumps(arguments, ensure_ascii=False)
        if "python" in names and "name" not in value:  # Functionary renders python's arguments so
            return "python", json.dumps(value, ensure_ascii=False)
    head = CALL_HEAD.match(text) if truncated else None
    if head is not None and (name := unquote(head.group(1))) in names:  # cut short in its arguments
        return name, text[head.end():]
    builtin = BUILTIN_CALL.fullmatch(text)
    if builtin is not None and builtin.group(1) in names:
        keywords = _keywords(text)
        if keywords is not None:
            return builtin.group(1), json.dumps(keywords, ensure_ascii=False)
    if "python" in names and text:  # code_interpreter: the code itself
        return "python", json.dumps({"code": text}, ensure_ascii=False)
    return None


def _keywords(call: str) -> dict[str, Any] | None:
    """`name.call(a="x", b=2)`'s arguments, read as Python literals (never evaluated)."""
    try:
        node = ast.parse(call, mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        return {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


class PythonTagCallParser(JsonMarkupCallParser):
    """`<|python_tag|>` and what follows it to the end of the answer (the model then stops with
    <|eom_id|>): read once the answer ends, so not streamed."""

    markers = (PYTHON_TAG,)

    def _opened(self, marker: str) -> State:
        if marker == PYTHON_TAG:
            self._code = ""
            return self._tagged
        return super()._opened(marker)

    def _tagged(self) -> bool:
        self._code += self._take(len(self._pending))
        return False

    def _end(self, truncated: bool) -> None:
        if self._state == self._tagged:
            call = tagged_call(self._code, self.names, truncated)
            if call is not None:
                self._complete(call[0], ToolCall.new_id(), call[1])
                return
        super()._end(truncated)


class LlamaCallParser(PythonTagCallParser):
    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(names)
        self._state = self._start

    def _start(self) -> bool:
        """A JSON call opens the answer (blanks aside); an answer that starts otherwise is content."""
        text = self._pending.lstrip()
        if not text:
            return False
        if text[0] == "{":
            self._raw, self._marked = "", False
            self._state = self._read_object(self._between_calls)
        else:
            self._state = self._content
        return True

    def _between_calls(self) -> bool:
        text = self._pending.lstrip(" \t\r\n;")
        if not text:
            return False
        self._pending = text
        if text[0] == "{":
            self._raw, self._marked = "", False
            self._state = self._read_object(self._between_calls)
        else:
            self._state = self._content
        return True


class Llama3Format(ChatFormat):
    name = "llama3"

    @classmethod
    def matches(cls, template: str) -> bool:
        # The call format Meta's templates spell out (3.1, 3.2 and 3.3 alike).
        return "<|start_header_id|>" in template and '"parameters": dictionary of argument name' in template

    def call_parser(self, names: frozenset[str]) -> LlamaCallParser:
        return LlamaCallParser(names)

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The template renders one call per assistant message (it raises on more): several calls
        become consecutive assistant messages."""
        out = []
        for m in messages:
            calls = m.get("tool_calls") or []
            out += [dict(m, tool_calls=[call]) for call in calls] if len(calls) > 1 else [dict(m)]
        return out
