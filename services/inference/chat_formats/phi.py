"""Microsoft Phi-3.5 and Phi-4: `<|user|>…<|end|><|assistant|>` turns. Phi-3.5's template knows no
tools (content, and the Hermes tags the tool grammar writes); Phi-4-mini writes its calls as a JSON
list, `<|tool_call|>[{"name": …, "arguments": {…}}]<|/tool_call|>`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.core.structured import ToolCall
from services.inference.chat_formats.base import ChatFormat
from services.inference.chat_formats.blocks import BlockCallParser
from services.inference.models.grammars import CallDelta

CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class PhiCallParser(BlockCallParser):
    """A list of calls read once it closes (it is short); one to a tool not offered keeps the list as content."""

    opens = (CALL_OPEN,)

    def read(self, block: str, end: bool, truncated: bool) -> int | None:
        close = block.find(CALL_CLOSE)
        if close == -1 and not end:
            return None
        took = len(block) if close == -1 else close + len(CALL_CLOSE)
        calls = _calls(block[:close] if close != -1 else block, whole=close != -1 or not truncated)
        if calls is None or any(name not in self.names for name, _ in calls):
            if not (truncated and close == -1):
                self.text(CALL_OPEN + block[:took])
            return took
        for name, arguments in calls:
            call = ToolCall(ToolCall.new_id(), name, arguments)
            self.delta(CallDelta(len(self.calls), call.id, name))
            self.delta(CallDelta(len(self.calls), arguments=arguments))
            self.call(call)
        return took


def _calls(body: str, whole: bool) -> list[tuple[str, str]] | None:
    """(name, arguments) of each call in the list; cut short (not `whole`), the last call's
    arguments are what was written of them."""
    if whole:
        try:
            value: Any = json.loads(body)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(i, dict) and isinstance(i.get("arguments", {}), dict) for i in items):
            return None
        return [(str(i.get("name")), json.dumps(i.get("arguments", {}), ensure_ascii=False)) for i in items]
    calls = []
    for head in CALL_HEAD.finditer(body):
        try:
            arguments, _ = json.JSONDecoder().raw_decode(body, head.end())
            calls.append((json.loads(f'"{head.group(1)}"'), json.dumps(arguments, ensure_ascii=False)))
        except ValueError:
            calls.append((json.loads(f'"{head.group(1)}"'), body[head.end():]))
            break
    return calls


class PhiFormat(ChatFormat):
    name = "phi"

    @classmethod
    def matches(cls, template: str) -> bool:
        # Apriel 1.5 shares the turn markers and adds <|content|>; gpt-oss has <|end|> and channels.
        return all(marker in template for marker in ("<|user|>", "<|assistant|>", "<|end|>")) \
            and not any(marker in template for marker in ("<|content|>", "<|channel|>"))

    @property
    def native_tools(self) -> bool:
        return "<|tool|>" in self.template  # Phi-4-mini lists the tools in its system turn

    def call_parser(self, names: frozenset[str]) -> PhiCallParser:
        return PhiCallParser(names)
