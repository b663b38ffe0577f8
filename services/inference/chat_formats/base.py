"""What every chat format shares: the parsed pieces of a model's output, the incremental parser that
splits one choice's text into reasoning, content and tool calls, and the ChatFormat a family
subclasses.

A family's output is read in two stages, each incremental (text may arrive a character at a time
and every split point must give the same result):
- a ReasoningSplitter takes the reasoning block off the front (`<think>…</think>` and the like);
- a CallParser reads the rest: content, and the family's tool-call syntax.
A family whose output does not fit that shape (gpt-oss's channels) gives its own OutputParser.
"""

from __future__ import annotations

import json

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.core.structured import Structure, ToolCall
from services.inference.models.grammars import CallDelta


@dataclass
class Parsed:
    """What a piece of output (or the end of it) adds to the answer."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)  # calls completed here
    deltas: list[CallDelta] = field(default_factory=list)  # pieces of calls being written

    def __iadd__(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls += other.calls
        self.deltas += other.deltas
        return self


class CallParser(Protocol):
    """Reads a family's answer (after its reasoning) into content and tool calls, incrementally.

    Text that may still become a call's markup is held back until it is known not to be. A call
    whose name is not among `names` is content, as written. Each call gets a fresh ToolCall.new_id()
    (or the id the model wrote, where the family writes ids)."""

    calls: list[ToolCall]  # every call completed so far

    def feed(self, text: str) -> tuple[str, list[ToolCall], list[CallDelta]]:
        """Content safe to show now, calls completed by this text, pieces of the call being written."""
        ...

    def flush(self, truncated: bool) -> tuple[str, list[ToolCall]]:
        """The end of the answer: the content held back, and the calls it completes. `truncated`:
        the answer ran out of tokens (max_tokens, the context); a call cut short whose name is known
        is then a call with the arguments written so far (OpenAI returns such calls with
        finish_reason "length"), never markup in the content."""
        ...


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a beginning of `marker` (text to hold back)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class JsonEnd:
    """Finds where a JSON object or array ends, in text that starts at its first bracket and arrives
    piece by piece: brackets counted outside strings (the finished text is parsed, not this)."""

    def __init__(self) -> None:
        self.done = False
        self._depth = 0
        self._in_string = self._escaped = False

    def scan(self, text: str) -> int:
        """The length of `text` up to and with the value's last character; -1 while it goes on."""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self.done = True
                    return i + 1
        return -1

    def take(self, text: str) -> int:
        """How much of `text` belongs to the value: all of it until the value ends (then `done`)."""
        n = self.scan(text)
        return len(text) if n == -1 else n


class ReasoningSplitter:
    """Takes a reasoning block off the front of an answer: `start` … `end`, the rest is the answer.

    `open_` says the prompt already opened the block (a template whose generation prompt ends with
    `<think>`): then the answer starts inside it. Otherwise a block counts only where it opens the
    answer (leading whitespace aside). A block that never ends is all reasoning, as llama-server
    reads it. The whitespace after `end` belongs to neither. `answer_starts`: markers that end the
    block too and are the answer's first text (Kimi K2 may write its calls inside the block)."""

    def __init__(self, start: str, end: str, open_: bool = False, answer_starts: tuple[str, ...] = ()) -> None:
        self.start, self.end = start, end
        self._answer_starts = answer_starts
        self._state = "inside" if open_ else "before"  # before | inside | after
        self._pending = ""
        self._strip_next = False
        self._begun = False  # inside: the reasoning's first non-blank character was seen

    @property
    def inside(self) -> bool:
        return self._state == "inside"

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer text) safe to pass on now."""
        self._pending += text
        reasoning = answer = ""
        while self._pending:
            if self._state == "before":
                stripped = self._pending.lstrip()
                if stripped.startswith(self.start):
                    self._pending = stripped[len(self.start):]
                    self._state = "inside"
                    continue
                if self.start.startswith(stripped):  # may still become the opening marker
                    break
                self._state = "after"
                continue
            if self._state == "inside":
                if not self._begun:  # the reasoning starts at its first non-blank character
                    self._pending = self._pending.lstrip()
                    if not self._pending:
                        break
                    self._begun = True
                markers = (self.end, *self._answer_starts)
                ends = [(self._pending.find(m), m) for m in markers if m in self._pending]
                if not ends:
                    # Held back: what may be the start of the end marker, and trailing blanks (the
                    # reasoning's last blanks are not part of it).
                    keep = max(partial_suffix(self._pending, m) for m in markers)
                    safe = self._pending[:len(self._pending) - keep].rstrip()
                    reasoning += safe
                    self._pending = self._pending[len(safe):]
                    break
                at, marker = min(ends)
                reasoning += self._pending[:at].rstrip()
                if marker == self.end:
                    self._pending = self._pending[at + len(self.end):]
                    self._state, self._strip_next = "after", True
                else:
                    self._pending, self._state = self._pending[at:], "after"
                continue
            if self._strip_next:
                self._pending = self._pending.lstrip()
                if not self._pending:
                    break
                self._strip_next = False
            answer += self._pending
            self._pending = ""
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        rest, self._pending = self._pending, ""
        if self._state == "inside":
            return rest.strip() if not self._begun else rest.rstrip(), ""
        if self._state == "before":
            return "", rest
        return "", "" if self._strip_next else rest


class OutputParser:
    """One choice's output: reasoning first (when the family reasons), then content and calls."""

    def __init__(self, reasoning: ReasoningSplitter | None, calls: CallParser | None) -> None:
        self.reasoning = reasoning
        self.call_parser = calls

    @property
    def calls(self) -> list[ToolCall]:
        return self.call_parser.calls if self.call_parser is not None else []

    def feed(self, text: str) -> Parsed:
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
        return self._answer(text, Parsed(reasoning=reasoning))

    def finish(self, truncated: bool = False) -> Parsed:
        """The end of the choice: everything held back."""
        out = Parsed()
        if self.reasoning is not None:
            reasoning, text = self.reasoning.flush()
            out.reasoning = reasoning
            out = self._answer(text, out)
        if self.call_parser is not None:
            complete = len(self.call_parser.calls)
            content, calls = self.call_parser.flush(truncated)
            if truncated and calls and complete:
                # Cut short after complete calls: those are the answer; the fragment is dropped (a lone
                # call cut short is returned, as OpenAI does, so that a forced call is never lost).
                del self.call_parser.calls[complete:]
                calls = []
            out.content += content
            out.calls += calls
        return out

    def _answer(self, text: str, out: Parsed) -> Parsed:
        if not text:
            return out
        if self.call_parser is None:
            out.content += text
            return out
        content, calls, deltas = self.call_parser.feed(text)
        out.content += content
        out.calls += calls
        out.deltas += deltas
        return out


def object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """A call as templates that read its arguments as an object want it (a JSON text parsed; text
    that is not JSON left as it is)."""
    function = dict(call.get("function", {}))
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function}


def parse_whole(parser: OutputParser, text: str, truncated: bool = False) -> Parsed:
    """A whole answer at once (tests, and answers that arrive whole)."""
    out = parser.feed(text)
    out += parser.finish(truncated)
    return out


class ChatFormat:
    """One model family's chat format: how a chat enters its template and how its output is read.

    Subclasses set `name`, `thinking` (the reasoning block's markers, or None) and override
    `matches` (is this template ours?) and `call_parser`; `template_messages` where the family's
    template wants calls and results in another shape than OpenAI's. One instance per loaded model."""

    name = "generic"
    thinking: tuple[str, str] | None = None  # (start, end) of the reasoning block
    own_parser = False  # output that needs parsing even without reasoning markers or tools (gpt-oss's channels)
    stop: tuple[str, ...] = ()  # text that ends a chat's answer besides the end-of-generation token

    def __init__(self, template: str = "") -> None:
        self.template = template

    @classmethod
    def matches(cls, template: str) -> bool:
        return False

    @property
    def native_tools(self) -> bool:
        """Whether the template renders `tools`, past calls and results itself (else the tools are
        described in a system message and calls written in Hermes tags:
        services.inference.models.grammars)."""
        return "tools" in self.template

    def check(self, structure: Structure, model_id: str) -> None:
        """Refuses (INVALID_ARGUMENT, naming it) what a request asks that this format cannot write."""

    def call_parser(self, names: frozenset[str]) -> CallParser | None:
        """The parser of this family's tool calls, for a request offering tools named `names`."""
        return None

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        """A parser for one choice of one request. `thinking_open`: the rendered prompt ends inside
        the reasoning block."""
        names = frozenset(t.name for t in structure.tools) if structure.calls_tools else frozenset()
        splitter = ReasoningSplitter(*self.thinking, open_=thinking_open) if self.thinking else None
        return OutputParser(splitter, self.call_parser(names) if names else None)

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages as this family's template reads them (OpenAI's shape by default: calls with
        their arguments as an object, a tool result with its call's id and name)."""
        return [dict(m) for m in messages]
