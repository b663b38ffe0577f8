"""Google Gemma. Gemma 2 (and 3): content only, its template knows no tools and no system role.
Gemma 4: a thought channel, `<|channel>thought\\n…<channel|>`, and calls in its own argument syntax,
`<|tool_call>call:NAME{key:<|"|>text<|"|>,n:1,list:[…]}<tool_call|>`, which are read into JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.core.structured import Structure, ToolCall
from services.inference.chat_formats.base import ChatFormat, OutputParser, object_arguments, partial_suffix
from services.inference.chat_formats.blocks import BlockCallParser
from services.inference.chat_formats.hermes import ToolCallParser
from services.inference.models.grammars import CallDelta

CALL_OPEN, CALL_CLOSE, CALL_HEAD = "<|tool_call>", "<tool_call|>", "call:"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
QUOTE = '<|"|>'


def arguments_json(text: str) -> tuple[str, bool]:
    """The JSON of the longest beginning of Gemma 4's arguments (`{…}`) whose tokens are complete,
    and whether the object closed there. The JSON of a longer beginning always extends it, so the
    pieces can stream."""
    out: list[str] = []
    stack: list[str] = []  # the open brackets
    expect_key, i = False, 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "{[":
            stack.append(c)
            out.append(c)
            expect_key, i = c == "{", i + 1
        elif c in "}]":
            if not stack:
                break
            stack.pop()
            out.append(c)
            expect_key, i = False, i + 1
            if not stack:
                return "".join(out), True
        elif c == ",":
            out.append(c)
            expect_key, i = bool(stack) and stack[-1] == "{", i + 1
        elif expect_key:  # a bare or quoted key, then ":"
            colon = text.find(":", i)
            if colon == -1:
                break
            key = text[i:colon].strip()
            if key.startswith(QUOTE) and key.endswith(QUOTE) and len(key) >= 2 * len(QUOTE):
                key = key[len(QUOTE):-len(QUOTE)]
            out.append(json.dumps(key, ensure_ascii=False) + ":")
            expect_key, i = False, colon + 1
        elif text.startswith(QUOTE, i):
            close = text.find(QUOTE, i + len(QUOTE))
            if close == -1:
                break
            out.append(json.dumps(text[i + len(QUOTE):close], ensure_ascii=False))
            i = close + len(QUOTE)
        else:  # a number, true, false, null (or a bare word), up to the next delimiter
            stop = min((at for at in (text.find(d, i) for d in ",}]") if at != -1), default=-1)
            if stop == -1:
                break
            word = text[i:stop].strip()
            try:
                json.loads(word)
            except ValueError:
                word = json.dumps(word, ensure_ascii=False)
            out.append(word)
            i = stop
    return "".join(out), False


class Gemma4CallParser(BlockCallParser):
    """Calls in `<|tool_call>…<tool_call|>`; a thought channel left in the answer (an empty one after
    the content, a stray `<channel|>`) is dropped."""

    opens = (CALL_OPEN, CHANNEL_OPEN, CHANNEL_CLOSE)

    def begin(self, opener: str) -> None:
        self._name: str | None = None  # "" when it is not a call to an offered tool
        self._sent = ""  # the arguments' JSON streamed so far

    def read(self, block: str, end: bool, truncated: bool) -> int | None:
        if self._opener == CHANNEL_CLOSE:
            return 0
        if self._opener == CHANNEL_OPEN:
            close = block.find(CHANNEL_CLOSE)
            return close + len(CHANNEL_CLOSE) if close != -1 else (len(block) if end else None)
        close = block.find(CALL_CLOSE)
        body = block if close == -1 else block[:close]
        took = close + len(CALL_CLOSE) if close != -1 else len(block) if end else None
        brace = body.find("{")
        if self._name is None and brace != -1:
            name = body[:brace].strip().removeprefix(CALL_HEAD)
            self._name = name if body.lstrip().startswith(CALL_HEAD) and name in self.names else ""
            if self._name:
                self._id = ToolCall.new_id()
                self.delta(CallDelta(len(self.calls), self._id, self._name))
        if not self._name:
            if took is not None and not (truncated and close == -1):
                self.text(CALL_OPEN + block[:took])  # not a call to an offered tool: content
            return took
        if close == -1 and not end:
            body = body[:len(body) - partial_suffix(body, CALL_CLOSE)]
        arguments, closed = arguments_json(body[brace:])
        if arguments[len(self._sent):]:
            self.delta(CallDelta(len(self.calls), arguments=arguments[len(self._sent):]))
            self._sent = arguments
        if took is None:
            return None
        if closed or truncated:
            self.call(ToolCall(self._id, self._name, arguments))
        else:  # the arguments never closed: not a call
            self.text(CALL_OPEN + block[:took])
        return took


class Gemma4Format(ChatFormat):
    name = "gemma4"
    thinking = ("<|channel>thought", CHANNEL_CLOSE)

    @classmethod
    def matches(cls, template: str) -> bool:
        return f"'{CALL_OPEN}{CALL_HEAD}'" in template

    def call_parser(self, names: frozenset[str]) -> Gemma4CallParser:
        return Gemma4CallParser(names)

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        out = super().parser(structure, thinking_open)
        if out.call_parser is None:  # without tools too: stray channel markers are not content
            out.call_parser = Gemma4CallParser(())
        return out

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Arguments as objects (the template writes them key by key). The older template (the
        "interleaved" one) reads results from the assistant message's `tool_responses` and not from
        tool messages, as llama.cpp's workaround gives them to it."""
        out = [_with_object_arguments(dict(m)) for m in messages]
        return out if "{#- OpenAI Chat Completions:" in self.template else _results_on_calls(out)


def _with_object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("tool_calls"):
        message["tool_calls"] = [object_arguments(call) for call in message["tool_calls"]]
    return message


def _results_on_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        i += 1
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            out.append(message)
            continue
        names = {c.get("id"): c.get("function", {}).get("name", "") for c in message["tool_calls"]}
        responses = []
        while i < len(messages) and messages[i].get("role") == "tool":
            result = messages[i]
            i += 1
            try:
                response = json.loads(result.get("content") or "")
            except (TypeError, ValueError):
                response = result.get("content")
            responses.append({"name": names.get(result.get("tool_call_id")) or result.get("name", ""),
                              "response": response})
        if (i < len(messages) and messages[i].get("role") == "assistant" and not messages[i].get("tool_calls")
                and messages[i].get("content")):  # the answer that follows is the same model turn
            message = {**message, "content": messages[i]["content"]}
            i += 1
        out.append({**message, "tool_responses": responses} if responses else message)
    return out


class Gemma2Format(ChatFormat):
    """Gemma 2 and 3: content, and the Hermes tags the tool grammar writes."""

    name = "gemma"

    @classmethod
    def matches(cls, template: str) -> bool:
        return "<start_of_turn>" in template

    def call_parser(self, names: frozenset[str]) -> ToolCallParser:
        return ToolCallParser(names)
