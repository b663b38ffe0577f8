"""The skeleton of a family whose calls are blocks of its own markup in the answer (Kimi K2, Gemma 4,
Phi-4): content, the family's blocks, and Hermes tags besides (the tool grammar writes those for
every family). A subclass names the markers that open its blocks and reads a block's text.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.core.structured import ToolCall
from services.inference.chat_formats.base import partial_suffix
from services.inference.chat_formats.hermes import ToolCallParser
from services.inference.models.grammars import CallDelta


class BlockCallParser:
    """A CallParser for content with blocks of a family's markup in it. Text between blocks goes
    through a Hermes parser; text that may be the start of an opening marker is held back."""

    opens: tuple[str, ...] = ()  # the markers that open a block

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.calls: list[ToolCall] = []
        self._hermes = ToolCallParser(self.names)
        self._hermes.calls = self.calls  # one list: a call's index counts the calls of both syntaxes
        self._pending = ""
        self._opener: str | None = None  # the marker of the block being read (None: in content)
        self._block = ""
        self._content: list[str] = []
        self._done: list[ToolCall] = []
        self._deltas: list[CallDelta] = []

    # --- for subclasses ------------------------------------------------------------------------
    def begin(self, opener: str) -> None:
        """A block opened by `opener` starts."""

    def read(self, block: str, end: bool, truncated: bool) -> int | None:
        """The block's text so far (after its opener): how much of it the block took once it is
        complete, else None. At the `end` of the answer the block must complete."""
        raise NotImplementedError

    def text(self, text: str) -> None:
        """Markup that is content after all (a call to a tool not offered), as written."""
        self._content.append(text)

    def call(self, call: ToolCall) -> None:
        self.calls.append(call)
        self._done.append(call)

    def delta(self, delta: CallDelta) -> None:
        self._deltas.append(delta)

    # --- CallParser ----------------------------------------------------------------------------
    def feed(self, text: str) -> tuple[str, list[ToolCall], list[CallDelta]]:
        self._pending += text
        self._run(end=False, truncated=False)
        return self._take()

    def flush(self, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        self._run(end=True, truncated=truncated)
        content, calls, _ = self._take()
        return content, calls

    def _run(self, end: bool, truncated: bool) -> None:
        while True:
            if self._opener is not None:
                self._block += self._pending
                self._pending = ""
                took = self.read(self._block, end, truncated)
                if took is None:
                    return
                self._pending, self._block, self._opener = self._block[took:], "", None
                continue
            found = [(self._pending.find(m), m) for m in self.opens if m in self._pending]
            if not found:
                keep = 0 if end else max((partial_suffix(self._pending, m) for m in self.opens), default=0)
                self._to_hermes(self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                if end:
                    content, calls = self._hermes.flush(truncated)
                    self._content.append(content)
                    self._done += calls
                return
            at, self._opener = min(found)
            self._to_hermes(self._pending[:at])
            content, calls = self._hermes.flush(False)  # the family's markup ends any Hermes text
            self._content.append(content)
            self._done += calls
            self._pending = self._pending[at + len(self._opener):]
            self.begin(self._opener)

    def _to_hermes(self, text: str) -> None:
        if text:
            content, calls, deltas = self._hermes.feed(text)
            self._content.append(content)
            self._done += calls
            self._deltas += deltas

    def _take(self) -> tuple[str, list[ToolCall], list[CallDelta]]:
        content = "".join(self._content)
        if self.calls and not content.strip():
            content = ""  # whitespace between calls is not content
        out = (content, self._done, self._deltas)
        self._content, self._done, self._deltas = [], [], []
        return out
