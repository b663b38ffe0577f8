"""OpenAI gpt-oss (the harmony format): the answer is a run of messages, each with a header and a
channel. The generation prompt ends with `<|start|>assistant`, so the answer starts with the first
message's header:

    <|channel|>analysis<|message|>…<|end|>                          reasoning
    <|start|>assistant<|channel|>final<|message|>…<|return|>         content (commentary too)
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}<|call|>
    <|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{…}<|call|>

A message addressed to an offered function is a call (whatever its channel); one addressed to
anything else (the built-in `python`, `container.exec`, a tool not offered) is dropped, as
llama-server drops it: it has no shape an OpenAI client could read. An answer that does not start
with a header (the Hermes tags the tool grammar writes, a continued message) is content.

openai-harmony (OpenAI's own parser) is not used: it reads token ids, not text, and needs a vocabulary
file downloaded at first use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from services.core.structured import Structure, ToolCall
from services.inference.chat_formats.base import ChatFormat, OutputParser, Parsed, object_arguments, partial_suffix
from services.inference.chat_formats.hermes import ToolCallParser
from services.inference.models.grammars import CallDelta

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
HEADER_STARTS = (START, CHANNEL, " to=", "to=")
MESSAGE_ENDS = ("<|end|>", "<|call|>", "<|return|>", START)
BUILT_IN_TOOLS = ("python", "browser", "container")  # harmony's own tools, addressed without a namespace
RECIPIENT = re.compile(r"to=([^\s<]+)")
CHANNEL_NAME = re.compile(r"\s*(\w+)")


class HarmonyParser(OutputParser):
    """One choice of gpt-oss output: messages routed by their headers to reasoning, content or calls."""

    def __init__(self, names: frozenset[str], thinking_open: bool = False) -> None:
        super().__init__(None, None)
        self._names = names
        self._content = ToolCallParser(names)  # content may hold Hermes tags (the tool grammar's)
        self._pending = ""
        # header: reading a header (up to <|message|>); body: reading a message; start: before a header
        self._state = "body" if thinking_open else "start"
        self._route = "reasoning" if thinking_open else "content"  # reasoning | content | call | drop
        self._reasoned = False  # some reasoning was written (the next analysis message is set apart)
        self._message_begun = thinking_open

    @property
    def calls(self) -> list[ToolCall]:
        return self._content.calls  # one list: a call's index counts the calls of both syntaxes

    def feed(self, text: str) -> Parsed:
        self._pending += text
        return self._run(Parsed(), end=False)

    def finish(self, truncated: bool = False) -> Parsed:
        out = self._run(Parsed(), end=True)
        if self._state == "body":
            self._end_message(out)
        content, calls = self._content.flush(truncated)
        out.content += content
        out.calls += calls
        return out

    def _run(self, out: Parsed, end: bool) -> Parsed:
        while self._pending:
            if self._state == "start":
                if self._pending.startswith(START):
                    self._pending, self._state = self._pending[len(START):], "header"
                elif self._pending.startswith(HEADER_STARTS):
                    self._state = "header"
                elif not end and any(m.startswith(self._pending) for m in HEADER_STARTS):
                    break  # may still become a header
                else:  # no header: content, as written
                    self._state, self._route, self._message_begun = "body", "content", False
                continue
            if self._state == "header":
                at = self._pending.find(MESSAGE)
                if at == -1:
                    if end:
                        self._pending = ""  # a header cut short says nothing
                    break
                self._open_message(self._pending[:at], out)
                self._pending = self._pending[at + len(MESSAGE):]
                continue
            ends = [(self._pending.find(m), m) for m in MESSAGE_ENDS if m in self._pending]
            if ends:
                at, marker = min(ends)
                self._write(self._pending[:at], out)
                self._pending = self._pending[at + (0 if marker == START else len(marker)):]
                self._end_message(out)
                self._state = "start"
                continue
            keep = max(partial_suffix(self._pending, m) for m in MESSAGE_ENDS)
            if end and self._route != "call":
                keep = 0  # the answer's last characters, not the start of a marker
            self._write(self._pending[:len(self._pending) - keep], out)
            # At the end, a call's arguments stop before a marker cut short (`<|` of `<|call|>`).
            self._pending = "" if end else self._pending[len(self._pending) - keep:]
            break
        return out

    def _open_message(self, header: str, out: Parsed) -> None:
        recipients = [r for r in RECIPIENT.findall(header) if r != "assistant"]
        channel = CHANNEL_NAME.match(header.rsplit(CHANNEL, 1)[-1])
        self._state, self._message_begun = "body", False
        if recipients:
            name = recipients[-1].removeprefix("functions.")
            # An offered function, named as the template names it (functions.NAME) or bare, as small
            # models write it.
            if name in self._names and (recipients[-1].startswith("functions.") or name not in BUILT_IN_TOOLS):
                self._route, self._call_id, self._name, self._arguments = "call", ToolCall.new_id(), name, ""
                out.deltas.append(CallDelta(len(self.calls), self._call_id, name))
            elif recipients[-1] in ("user", "all"):  # addressed to the reader: it is the answer
                self._route = "content"
            else:  # a built-in tool (browser, python) or a function not offered
                self._route = "drop"
        elif channel and channel.group(1) == "analysis":
            self._route = "reasoning"
        else:
            self._route = "content"

    def _write(self, text: str, out: Parsed) -> None:
        if not text:
            return
        if self._route == "reasoning":
            if self._reasoned and not self._message_begun:
                out.reasoning += "\n"
            out.reasoning += text
            self._reasoned = True
        elif self._route == "content":
            content, calls, deltas = self._content.feed(text)
            out.content += content
            out.calls += calls
            out.deltas += deltas
        elif self._route == "call":
            self._arguments += text
            out.deltas.append(CallDelta(len(self.calls), arguments=text))
        self._message_begun = True

    def _end_message(self, out: Parsed) -> None:
        if self._route == "call":  # a call's message may end with the answer (no <|call|>)
            call = ToolCall(self._call_id, self._name, self._arguments)
            self.calls.append(call)
            out.calls.append(call)
        self._route = "drop"


class GptOssFormat(ChatFormat):
    name = "gpt-oss"

    @classmethod
    def matches(cls, template: str) -> bool:
        return CHANNEL in template and MESSAGE in template

    def parser(self, structure: Structure, thinking_open: bool = False) -> OutputParser:
        names = frozenset(t.name for t in structure.tools) if structure.calls_tools else frozenset()
        return HarmonyParser(names, thinking_open)

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The template renders one call per assistant message, names a result after the call before
        it, reads reasoning from `thinking` and arguments as objects: an assistant message with
        several calls becomes one message per call, each followed by its results."""
        out: list[dict[str, Any]] = []
        i = 0
        while i < len(messages):
            message = dict(messages[i])
            i += 1
            if message.get("role") != "assistant":
                out.append(message)
                continue
            thinking = message.pop("reasoning_content", None) or message.pop("reasoning", None)
            calls = message.pop("tool_calls", None) or []
            if message.get("content") is None:
                message["content"] = ""
            if thinking and not (calls and message["content"]):  # the template refuses both beside a call
                message["thinking"] = thinking
            if not calls:
                out.append(message)
                continue
            results = []
            while i < len(messages) and messages[i].get("role") == "tool":
                results.append(dict(messages[i]))
                i += 1
            for n, call in enumerate(calls):
                turn = message if n == 0 else {"role": "assistant", "content": ""}
                out.append({**turn, "tool_calls": [object_arguments(call)]})
                out += [r for r in results if r.get("tool_call_id") == call.get("id")]
            ids = {call.get("id") for call in calls}
            out += [r for r in results if r.get("tool_call_id") not in ids]
        return out
