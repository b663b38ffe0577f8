"""What the families' call parsers share: a state machine over the text held back, content scanned
for the markers that open calls, a call's JSON arguments streamed as they are written, and Hermes
tags understood everywhere (the tool grammar writes them: services.inference.models.grammars).

Markup that turns out not to be a call of an offered tool is content, as written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.core.structured import ToolCall
from services.inference.chat_formats.base import JsonEnd, partial_suffix
from services.inference.models.grammars import CLOSE, OPEN, CallDelta

# A call object up to its arguments' value. Llama writes "parameters", and at times a "type" first.
CALL_HEAD = re.compile(r'\s*\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'
                       r'"(?:arguments|parameters)"\s*:\s*')
OBJECT_START = re.compile(r'\s*\{\s*"')  # what every call object starts with
NOT_AN_OBJECT = re.compile(r'\s*(?:[^\s{]|\{\s*[^\s"])')
MAX_HEAD = 256  # a name in markup is no longer than this (past it, the markup is content)

State = Callable[[], bool]  # takes what it can of the text held back; False: it waits for more


@dataclass
class CallInProgress:
    index: int  # its place among the choice's calls
    id: str
    name: str
    streamed: bool = True  # its pieces go out as CallDeltas (not where the model writes the id last)
    arguments: str = ""  # written so far
    end: JsonEnd = field(default_factory=JsonEnd)


def unquote(text: str) -> str | None:
    """A JSON string's characters (between its quotes) as text; None when they are not valid JSON."""
    try:
        return json.loads(f'"{text}"')
    except ValueError:
        return None


def arguments_object(value: object) -> dict | None:
    """Arguments as an object (some models write them as a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


class JsonMarkupCallParser:
    """The base of the families' CallParsers. Content is scanned for `markers` (and Hermes's
    `<tool_call>`); `_opened` gives the state that reads what follows each. Blanks just before
    markup, and just after a call, are not content."""

    markers: tuple[str, ...] = ()

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.calls: list[ToolCall] = []
        self._pending = ""  # text not yet read
        self._raw = ""  # the markup read since the current block opened: content if it is no call
        self._marked = True  # the block was opened by a marker (not by a bare "{")
        self._blanks = ""  # blanks at the end of the content: content unless markup follows
        self._strip = False  # the blanks after a call are no content
        self._call: CallInProgress | None = None
        self._then: State = self._content  # where a call's block goes once it is complete
        self._state: State = self._content
        self._out: list[str] = []
        self._done: list[ToolCall] = []
        self._deltas: list[CallDelta] = []

    # --- the CallParser protocol -------------------------------------------------------------
    def feed(self, text: str) -> tuple[str, list[ToolCall], list[CallDelta]]:
        self._pending += text
        while self._state():
            pass
        content, calls, deltas = "".join(self._out), self._done, self._deltas
        self._out, self._done, self._deltas = [], [], []
        return content, calls, deltas

    def flush(self, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        self._end(truncated)
        content, calls = "".join(self._out), self._done
        self._out, self._done, self._deltas = [], [], []
        self._pending = self._raw = self._blanks = ""
        self._state, self._call = self._content, None
        return content, calls

    def _end(self, truncated: bool) -> None:
        """The answer ends. Cut short (`truncated`) in a call whose arguments began: that call as
        written so far; in markup before that, nothing. An unfinished block is content when no call
        came before it (as Hermes)."""
        call = self._call
        if self._state == self._content:
            self._out.append(self._blanks + self._pending)
        elif truncated and call is not None and call.arguments:
            self._complete(call.name, call.id, call.arguments)
        elif not self.calls and not (truncated and self._marked):
            self._say(self._raw + self._pending)
            self._out.append(self._blanks)

    # --- content ---------------------------------------------------------------------------------
    def _opened(self, marker: str) -> State:
        """The state reading what follows `marker`."""
        assert marker == OPEN
        return self._read_object(self._hermes_close)

    def _content(self) -> bool:
        text = self._pending
        if self._strip:
            text = text.lstrip()
            if not text:
                self._pending = ""
                return False
            self._strip = False
        markers = self.markers + (OPEN,)
        found = min(((at, -len(m), m) for m in markers if (at := text.find(m)) != -1), default=None)
        if found is None:
            keep = max(partial_suffix(text, m) for m in markers)
            self._say(text[:len(text) - keep])
            self._pending = text[len(text) - keep:]
            return False
        at, _, marker = found
        before = self._blanks + text[:at]
        said = before.rstrip()
        if said:
            self._out.append(said)
        self._blanks = ""
        self._raw, self._marked = before[len(said):] + marker, True
        self._pending = text[at + len(marker):]
        self._state = self._opened(marker)
        return True

    def _say(self, text: str) -> None:
        """Content; the blanks at its end wait to see whether markup follows."""
        text = self._blanks + text
        said = text.rstrip()
        self._blanks = text[len(said):]
        if said:
            self._out.append(said)

    def _take(self, n: int) -> str:
        """The next `n` characters, read as part of the current block."""
        taken, self._pending = self._pending[:n], self._pending[n:]
        self._raw += taken
        return taken

    def _take_blanks(self) -> bool:
        """Takes the blanks ahead; whether something else follows them."""
        self._take(len(self._pending) - len(self._pending.lstrip()))
        return bool(self._pending)

    def _not_a_call(self) -> bool:
        self._say(self._raw)
        self._raw, self._call, self._state = "", None, self._content
        return True

    def _complete(self, name: str, id_: str, arguments: str) -> None:
        call = ToolCall(id_, name, arguments)
        self.calls.append(call)
        self._done.append(call)
        self._raw, self._call, self._strip = "", None, True

    def _expect(self, marker: str) -> bool:
        """After a call: its closing `marker` where written, then content."""
        text = self._pending.lstrip()
        if marker.startswith(text) and len(text) < len(marker):
            return False
        if text.startswith(marker):
            self._pending = text[len(marker):]
        self._state = self._content
        return True

    def _hermes_close(self) -> bool:
        return self._expect(CLOSE)

    # --- a call's arguments, after markup that named it ------------------------------------------
    def _read_arguments(self, name: str, then: State, id_: str | None = None) -> State:
        self._call = CallInProgress(len(self.calls), id_ or ToolCall.new_id(), name)
        self._then = then
        return self._arguments

    def _arguments(self) -> bool:
        call = self._call
        assert call is not None
        if not call.arguments:
            if not self._take_blanks():
                return False
            if self._pending[0] != "{":
                return self._not_a_call()
            self._deltas.append(CallDelta(call.index, call.id, call.name))
        self._take(self._write(self._pending))
        if not call.end.done:
            return False
        if arguments_object(call.arguments) is None:
            return self._not_a_call()
        self._complete(call.name, call.id, call.arguments)
        self._state = self._then
        return True

    def _write(self, text: str) -> int:
        """Adds the arguments' next characters from `text` to the call; how many there were."""
        call = self._call
        assert call is not None
        n = call.end.take(text)
        if n:
            call.arguments += text[:n]
            if call.streamed:
                self._deltas.append(CallDelta(call.index, arguments=text[:n]))
        return n

    # --- a call object: {"name": …, "arguments": {…}} --------------------------------------------
    def _read_object(self, then: State, written_id: bool = False) -> State:
        """`written_id`: the object carries the call's id (Mistral Nemo writes it after the
        arguments, so such calls come whole, not streamed)."""
        self._body, self._body_end, self._then = "", JsonEnd(), then
        self._written_id, self._shaped, self._args_at = written_id, False, -1
        return self._object

    def _object(self) -> bool:
        if not self._shaped:
            if NOT_AN_OBJECT.match(self._body + self._pending):
                return self._not_a_call()
            self._shaped = OBJECT_START.match(self._body + self._pending) is not None
        self._body += self._take(self._body_end.take(self._pending))
        if self._args_at < 0 and self._shaped and not self._head():
            return self._not_a_call()
        call = self._call
        if call is not None and not call.end.done:
            self._write(self._body[self._args_at + len(call.arguments):])
        if not self._body_end.done:
            return False
        try:
            value = json.loads(self._body)
        except ValueError:
            return self._not_a_call()
        name = value.get("name") if isinstance(value, dict) else None
        arguments = arguments_object(value.get("arguments", value.get("parameters"))) if name else None
        if not isinstance(name, str) or name not in self.names or arguments is None:
            return self._not_a_call()
        if call is not None and call.end.done:  # read as it was written: the call is those pieces
            name, id_, text = call.name, call.id, call.arguments
        else:
            id_, text = ToolCall.new_id(), json.dumps(arguments, ensure_ascii=False)
        written = value.get("id")
        if self._written_id and isinstance(written, str) and written:
            id_ = written
        self._complete(name, id_, text)
        self._state = self._then
        return True

    def _head(self) -> bool:
        """Reads the object's name once written; False when it names no offered tool. Its
        arguments are read from their first character on, if they are an object."""
        head = CALL_HEAD.match(self._body)
        if head is None or head.end() == len(self._body):
            return True
        name = unquote(head.group(1))
        if name not in self.names:
            return False
        self._args_at = head.end()
        if self._body[head.end()] == "{":
            self._call = CallInProgress(len(self.calls), ToolCall.new_id(), name, streamed=not self._written_id)
            if self._call.streamed:
                self._deltas.append(CallDelta(self._call.index, self._call.id, name))
        return True

    # --- a JSON list of call objects: [{…}, {…}] (after its "[") --------------------------------
    def _read_list(self, written_id: bool = False) -> State:
        self._list_ids = written_id
        return self._list_item

    def _list_item(self) -> bool:
        if not self._take_blanks():
            return False
        if self._pending[0] == "{":
            self._state = self._read_object(self._list_next, self._list_ids)
            return True
        return self._not_a_call()

    def _list_next(self) -> bool:
        if not self._take_blanks():
            return False
        if self._pending[0] == ",":
            self._take(1)
            self._state = self._list_item
        else:  # "]" ends the list; anything else is content
            if self._pending[0] == "]":
                self._take(1)
            self._raw, self._state = "", self._content
        return True
