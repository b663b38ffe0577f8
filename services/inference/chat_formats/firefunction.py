"""FireFunction v2 (Fireworks' Llama 3 fine-tune): calls as one JSON list after a `functools`
marker, ` functools[{"name": …, "arguments": {…}}, …]`.
"""

from __future__ import annotations

from services.inference.chat_formats.base import ChatFormat
from services.inference.chat_formats.json_markup import JsonMarkupCallParser, State

FUNCTOOLS = "functools["


class FireFunctionCallParser(JsonMarkupCallParser):
    markers = (FUNCTOOLS,)

    def _opened(self, marker: str) -> State:
        return self._read_list() if marker == FUNCTOOLS else super()._opened(marker)


class FireFunctionFormat(ChatFormat):
    name = "firefunction-v2"

    @classmethod
    def matches(cls, template: str) -> bool:
        return "functools[" in template

    @property
    def native_tools(self) -> bool:
        # The template reads the tools from `functions` (a JSON text) and `datetime`, not `tools`.
        return False

    def call_parser(self, names: frozenset[str]) -> FireFunctionCallParser:
        return FireFunctionCallParser(names)
