"""Hermes-style calls (NousResearch Hermes 2 Pro / 3, Qwen 2.5, Qwen3, QwQ, and the fallback for every
template without a format of its own): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, after
an optional `<think>…</think>` block where the template knows one.

This is also the syntax the tool grammar writes (services.inference.models.grammars), so every family's
parser falls back on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from services.core.structured import ToolCall
from services.inference.chat_formats.base import ChatFormat, JsonEnd, partial_suffix
from services.inference.models.grammars import CLOSE, OPEN, CallDelta

# The start of a call as the grammar writes it (name first), up to where its arguments begin.
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


class ToolCallParser:
    """Splits one choice's streamed text into content, tool calls and the pieces of the call being
    written. Text that may be the start of `<tool_call>` is held back until it is known not to be;
    once a call's name is known its arguments stream as they come (CallDelta); the call itself is
    emitted once it is complete."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = set(names)
        self._pending = ""
        self.calls: list[ToolCall] = []
        self._body: str | None = None  # the text of the call being written (None: not in a call)

    def feed(self, text: str) -> tuple[str, list[ToolCall], list[CallDelta]]:
        self._pending += text
        out: list[str] = []
        calls: list[ToolCall] = []
        deltas: list[CallDelta] = []
        while True:
            if self._body is not None:
                end = self._pending.find(CLOSE)
                # What may be the start of `</tool_call>` waits in _pending for the rest of it.
                take = len(self._pending) - partial_suffix(self._pending, CLOSE) if end == -1 else end
                self._body += self._pending[:take]
                self._pending = self._pending[take:] if end == -1 else self._pending[end + len(CLOSE):]
                deltas += self._advance()
                if end == -1:
                    break
                body, call = self._body, self._finish()
                if call is None:  # not a call after all: keep it as text
                    out.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
                    self.calls.append(call)
                    self._pending = self._pending.lstrip()
                continue
            start = self._pending.find(OPEN)
            if start == -1:
                keep = partial_suffix(self._pending, OPEN)
                out.append(self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                break
            out.append(self._pending[:start])
            self._pending = self._pending[start + len(OPEN):]
            self._start_call()
        text_out = "".join(out)
        if self.calls and not text_out.strip():
            text_out = ""  # whitespace between calls is not content
        return text_out, calls, deltas

    def flush(self, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        """The rest at the end of the choice. Cut short inside a call whose name is known
        (`truncated`): that call with the arguments written so far. Otherwise an unfinished call
        after complete ones is dropped, an unfinished call alone is text."""
        if truncated and self._body is not None:
            self._advance()
            name, body, self._body, self._pending = self._name, self._body, None, ""
            if name and self._from >= 0:
                call = ToolCall(self._id, name, body[self._from:self._to if self._to >= 0 else None])
                self.calls.append(call)
                return "", [call]
            return "", []
        rest = (OPEN + self._body if self._body is not None else "") + self._pending
        self._pending, self._body = "", None
        if self.calls and (not rest.strip() or rest.startswith(OPEN)):
            return "", []
        return rest, []

    # --- the call being written ---------------------------------------------------------------
    def _start_call(self) -> None:
        self._body = ""
        self._id = ToolCall.new_id()
        self._name: str | None = None  # known once the head is complete; "" when it never will be
        self._scan = 0  # how far the arguments have been read
        self._from = -1  # where they start (their "{")
        self._to = -1  # where they end
        self._json = JsonEnd()

    def _advance(self) -> list[CallDelta]:
        """The head once it is complete, then the arguments' next characters, read as JSON."""
        assert self._body is not None
        deltas = []
        if self._name is None:
            head = CALL_HEAD.match(self._body)
            if head is None:
                return []
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                name = ""
            self._name = name if name in self._names else ""
            if not self._name:
                return []
            self._scan = head.end()
            deltas.append(CallDelta(len(self.calls), self._id, self._name))
        if not self._name or self._to >= 0:
            return deltas
        body, i = self._body, self._scan
        if self._from < 0:
            while i < len(body) and body[i].isspace():
                i += 1
            if i == len(body):
                self._scan = i
                return deltas
            if body[i] != "{":  # arguments that are not an object: no streaming, the end decides
                self._name = ""
                return deltas
            self._from = i
        n = self._json.scan(body[i:])
        if n == -1:
            i = len(body)
        else:
            i += n
            self._to = i
        piece = body[max(self._scan, self._from):i] if self._from >= 0 else ""
        self._scan = i
        if piece:
            deltas.append(CallDelta(len(self.calls), arguments=piece))
        return deltas

    def _finish(self) -> ToolCall | None:
        body, self._body = self._body or "", None
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(value, dict) and value.get("name") in self._names):
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        if self._name and self._to >= 0:  # streamed: the call is exactly the pieces sent
            return ToolCall(self._id, self._name, body[self._from:self._to])
        return ToolCall(self._id, value["name"], json.dumps(arguments, ensure_ascii=False))


class HermesFormat(ChatFormat):
    """Hermes tags, and a `<think>` block where the template writes or strips one (Qwen3, QwQ,
    DeepSeek-R1 distills on Qwen, SmolLM3). The fallback: it matches any template."""

    name = "hermes"

    def __init__(self, template: str = "") -> None:
        super().__init__(template)
        self.thinking = ("<think>", "</think>") if "think>" in template else None

    @classmethod
    def matches(cls, template: str) -> bool:
        return True

    @property
    def native_tools(self) -> bool:
        return "tools" in self.template and OPEN in self.template

    def call_parser(self, names: frozenset[str]) -> ToolCallParser:
        return ToolCallParser(names)
