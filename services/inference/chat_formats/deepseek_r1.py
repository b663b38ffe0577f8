"""DeepSeek R1 (the R1 distills on Llama and Qwen, llama.cpp's own R1 template): `<think>` reasoning,
which the generation prompt opens, and calls in DeepSeek's markup:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The call parser also reads V3.1's shorter call (`<｜tool▁call▁begin｜>name<｜tool▁sep｜>{…}`), which
deepseek_v3 reuses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from services.inference.chat_formats.base import ChatFormat
from services.inference.chat_formats.base import JsonEnd
from services.inference.chat_formats.markup import DONE, TEXT, MarkupCallParser

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
FENCE = "```"


class DeepSeekCallParser(MarkupCallParser):
    """Calls in DeepSeek's markup: R1's (`function<｜tool▁sep｜>name` and fenced JSON) and V3.1's
    (`name<｜tool▁sep｜>` and bare JSON). A call is complete once its JSON is; the markers after it
    are taken when they come."""

    openers = (CALLS_BEGIN, CALL_BEGIN)

    def _open(self, opener: str) -> None:
        # section | head | name | fence | lang | arguments | fence_end | call_end
        self._state = "section" if opener == CALLS_BEGIN else "head"

    def _read(self) -> str | None:
        while True:
            state = self._state
            if state in ("section", "fence", "fence_end", "call_end") and not self._skip_blanks():
                return None
            if state == "section":  # between calls
                begun = self._literal(CALL_BEGIN)
                if begun:
                    self._state = "head"
                    continue
                ended = self._literal(CALLS_END)
                if ended:
                    return DONE
                return None if begun is None or ended is None else TEXT
            elif state == "head":  # `function<｜tool▁sep｜>` (R1) or `name<｜tool▁sep｜>` (V3.1)
                head = self._until(SEP)
                if head is None:
                    return None
                if head.strip() == "function":
                    self._state = "name"
                elif not self._begin(head.strip()):
                    return TEXT
                else:
                    self._state = "arguments"
            elif state == "name":  # R1: the name, up to its line's end or the fence
                end = re.search(r"\n|`|\{", self._pending)
                if end is None:
                    return None
                if not self._begin(self._take(end.start()).strip()):
                    return TEXT
                self._state = "fence"
            elif state == "fence":
                if (fenced := self._literal(FENCE)) is None:
                    return None
                self._state = "lang" if fenced else "arguments"
            elif state == "lang":
                if self._literal("json") is None:
                    return None
                self._state = "arguments"
            elif state == "arguments":
                if not self._read_arguments():
                    return None if self._call is not None else TEXT
                self._state = "fence_end"
            elif state == "fence_end":
                if self._literal(FENCE) is None:
                    return None
                self._state = "call_end"
            else:  # call_end
                if self._literal(CALL_END) is None:
                    return None
                self._state = "section"

    def _read_arguments(self) -> bool:
        """Stream the call's JSON object; True once it is complete (and so the call)."""
        assert self._call is not None
        if not self._arguments:
            if not self._skip_blanks():
                return False
            if self._pending[0] != "{":
                self._call = None
                return False
            self._json = JsonEnd()
        end = self._json.scan(self._pending)
        self._stream(self._take(len(self._pending) if end == -1 else end))
        if end == -1:
            return False
        self._end_call()
        return True


class DeepSeekR1Format(ChatFormat):
    name = "deepseek-r1"
    thinking = ("<think>", "</think>")

    @classmethod
    def matches(cls, template: str) -> bool:
        # R1 writes the call's type before the separator; V3.1 writes the name there.
        return CALLS_BEGIN in template and re.search(r"\['type'\]\s*\+\s*'" + SEP, template) is not None

    def call_parser(self, names: frozenset[str]) -> DeepSeekCallParser:
        return DeepSeekCallParser(names)

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        # The templates read a message with calls as one whose content is none, and some of them
        # splice each call's arguments in as text rather than through `tojson`.
        as_text = re.search(r"\['arguments'\]\s*\+", self.template) is not None
        out = []
        for message in messages:
            message = dict(message)
            if message.get("tool_calls"):
                message["content"] = message.get("content") or None
                if as_text:
                    message["tool_calls"] = [
                        {**call, "function": {**call["function"],
                                              "arguments": json.dumps(call["function"]["arguments"])}}
                        for call in message["tool_calls"]]
            out.append(message)
        return out
