"""Mistral's `[TOOL_CALLS]` formats, one parser for all of them:
- Nemo: `[TOOL_CALLS][{"name": …, "arguments": {…}, "id": "123456789"}, …]`;
- Small 3.2: `[TOOL_CALLS]name[CALL_ID]123456789[ARGS]{…}`, once per call;
- Devstral, Ministral 3 and Magistral: `[TOOL_CALLS]name[ARGS]{…}`, after a `[THINK]…[/THINK]` block
  where the template knows one.
The ids the model writes are the calls' ids.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from typing import Any

from services.inference.chat_formats.base import ChatFormat
from services.inference.chat_formats.json_markup import MAX_HEAD, JsonMarkupCallParser, State

TOOL_CALLS, CALL_ID, ARGS = "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"
ID_ALPHABET = string.ascii_letters + string.digits


class MistralCallParser(JsonMarkupCallParser):
    markers = (TOOL_CALLS,)

    def _opened(self, marker: str) -> State:
        return self._tool_calls if marker == TOOL_CALLS else super()._opened(marker)

    def _tool_calls(self) -> bool:
        if not self._take_blanks():
            return False
        if self._pending[0] == "[":  # Nemo's list
            self._take(1)
            self._state = self._read_list(written_id=True)
            return True
        at = self._pending.find(ARGS)
        if at == -1:
            return False if len(self._pending) < MAX_HEAD and "\n" not in self._pending else self._not_a_call()
        name, _, written_id = self._take(at + len(ARGS))[:at].partition(CALL_ID)
        if name.strip() not in self.names:
            return self._not_a_call()
        self._state = self._read_arguments(name.strip(), self._content, written_id.strip() or None)
        return True


def mistral_id(call_id: str) -> str:
    """Mistral's templates want ids of 9 letters or digits: another id maps to one, the same each
    time (a call and its result must still agree)."""
    if len(call_id) == 9 and all(c in ID_ALPHABET for c in call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(ID_ALPHABET[b % len(ID_ALPHABET)] for b in digest[:9])


class MistralFormat(ChatFormat):
    name = "mistral"

    def __init__(self, template: str = "") -> None:
        super().__init__(template)
        self.thinking = ("[THINK]", "[/THINK]") if "[THINK]" in template else None

    @classmethod
    def matches(cls, template: str) -> bool:
        return TOOL_CALLS in template and "[AVAILABLE_TOOLS]" in template

    def call_parser(self, names: frozenset[str]) -> MistralCallParser:
        return MistralCallParser(names)

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [dict(c, id=mistral_id(c.get("id") or "")) for c in m["tool_calls"]]
            if m.get("tool_call_id"):
                m["tool_call_id"] = mistral_id(m["tool_call_id"])
            out.append(m)
        return out
