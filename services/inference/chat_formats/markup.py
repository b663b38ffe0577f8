"""What the parsers of families with call markup of their own share: the scan of the answer for the
family's openers, with the rest handed on to a Hermes parser (the tool grammar writes Hermes tags in
every family); the call being written and its streamed pieces; where a JSON value ends in text that
arrives piece by piece; a list of JSON call objects (Command R7B, Granite); a reasoning block that a
call ends."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from services.core.structured import ToolCall
from services.inference.chat_formats.base import JsonEnd, ReasoningSplitter, partial_suffix
from services.inference.chat_formats.hermes import ToolCallParser
from services.inference.models.grammars import CLOSE, CallDelta

# What a family's reader says after reading what it could of its markup.
DONE = "done"  # the markup ended: back to content
TEXT = "text"  # it was not a call after all: the markup read so far is content

STRING = r'"(?:[^"\\]|\\.)*"'


def unquote(text: str) -> str:
    """A JSON string's text, quotes included, as its value."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


class MarkupCallParser:
    """A CallParser for a family whose calls open with one of `openers`. Text outside the family's
    markup goes on to a Hermes parser (sharing the list of calls, so indices follow both kinds in
    order). A subclass reads its markup in `_read`, from `_pending`, with the helpers below."""

    openers: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # markers around content that are not content (`<response>`)
    blanks_before_markup = True  # whether the blanks before the markup are content

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.calls: list[ToolCall] = []
        self._hermes = ToolCallParser(self.names)
        self._hermes.calls = self.calls
        self._pending = ""
        self._markup: str | None = None  # the markup read so far; None while reading content
        self._call: ToolCall | None = None  # the call being written (its id and name)
        self._arguments = ""  # its arguments so far
        self._content: list[str] = []
        self._completed: list[ToolCall] = []
        self._deltas: list[CallDelta] = []

    # --- the CallParser protocol ----------------------------------------------------------------
    def feed(self, text: str) -> tuple[str, list[ToolCall], list[CallDelta]]:
        self._pending += text
        while True:
            if self._markup is None:
                if self._hermes._body is not None:  # inside a Hermes call: its JSON is not our markup
                    # Up to the call's end, which may begin in what the Hermes parser holds back.
                    held = self._hermes._pending
                    end = (held + self._pending).find(CLOSE)
                    taken = len(self._pending) if end == -1 else end + len(CLOSE) - len(held)
                    self._to_hermes(self._pending[:taken])
                    self._pending = self._pending[taken:]
                    if end == -1:
                        break
                    continue
                at, opener = self._find_opener()
                if opener is None:
                    keep = max(partial_suffix(self._pending, o) for o in self.openers + self.dropped)
                    if not self.blanks_before_markup:  # held until what follows them shows
                        safe = self._pending[:len(self._pending) - keep]
                        keep += len(safe) - len(safe.rstrip())
                    self._to_hermes(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                before = self._pending[:at]
                self._to_hermes(before if self.blanks_before_markup or opener in self.dropped else before.rstrip())
                self._pending = self._pending[at + len(opener):]
                if opener in self.dropped:
                    continue
                self._markup = opener
                self._open(opener)
                continue
            state = self._read()
            if state is None:
                break
            if state == TEXT:
                self._to_hermes(self._markup)
            self._markup, self._call = None, None
        return self._out()

    def flush(self, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        if self._markup is not None:
            call, markup = self._call, self._markup + self._pending
            self._markup, self._call, self._pending = None, None, ""
            if truncated and call is not None:
                self._complete(ToolCall(call.id, call.name, self._arguments))
            elif truncated or self.calls:
                pass  # markup cut short before a known name, or after complete calls: dropped
            else:
                self._to_hermes(markup)
        else:
            self._to_hermes(self._pending)
            self._pending = ""
        content, calls, _ = self._out()
        rest, more = self._hermes.flush(truncated)
        if self.calls and not rest.strip():
            rest = ""
        return content + rest, calls + more

    # --- for the family's reader ----------------------------------------------------------------
    def _open(self, opener: str) -> None:
        """The markup opened with `opener` (already taken off _pending): set up to read it."""

    def _read(self) -> str | None:
        """Read what can be read of the markup: DONE, TEXT, or None for more text."""
        raise NotImplementedError

    def _take(self, n: int) -> str:
        """The next `n` characters of the markup."""
        assert self._markup is not None
        piece, self._pending = self._pending[:n], self._pending[n:]
        self._markup += piece
        return piece

    def _skip_blanks(self) -> bool:
        """Take the blanks ahead; whether something else follows."""
        self._take(len(self._pending) - len(self._pending.lstrip()))
        return bool(self._pending)

    def _literal(self, marker: str) -> bool | None:
        """Take `marker` if it is next: True; False if something else is; None while it may be."""
        if self._pending.startswith(marker):
            self._take(len(marker))
            return True
        return None if marker.startswith(self._pending) else False

    def _until(self, marker: str) -> str | None:
        """The text up to `marker`, both taken; None while `marker` has not come."""
        at = self._pending.find(marker)
        if at == -1:
            return None
        text = self._take(at)
        self._take(len(marker))
        return text

    def _begin(self, name: str, call_id: str = "") -> bool:
        """A call to `name` starts (False: no such tool, the markup is text)."""
        if name not in self.names:
            return False
        self._call, self._arguments = ToolCall(call_id or ToolCall.new_id(), name, ""), ""
        self._deltas.append(CallDelta(len(self.calls), self._call.id, name))
        return True

    def _stream(self, piece: str) -> None:
        assert self._call is not None
        if piece:
            self._arguments += piece
            self._deltas.append(CallDelta(len(self.calls), arguments=piece))

    def _end_call(self) -> None:
        assert self._call is not None
        self._complete(ToolCall(self._call.id, self._call.name, self._arguments))
        self._call, self._markup = None, ""  # the markup so far made this call: never text

    # --- inside -----------------------------------------------------------------------------------
    def _complete(self, call: ToolCall) -> None:
        self.calls.append(call)
        self._completed.append(call)

    def _find_opener(self) -> tuple[int, str | None]:
        found = [(at, o) for o in self.openers + self.dropped if (at := self._pending.find(o)) != -1]
        return min(found) if found else (-1, None)

    def _to_hermes(self, text: str) -> None:
        if text:
            content, calls, deltas = self._hermes.feed(text)  # its calls are in self.calls already
            self._content.append(content)
            self._completed += calls
            self._deltas += deltas

    def _out(self) -> tuple[str, list[ToolCall], list[CallDelta]]:
        content, calls, deltas = "".join(self._content), self._completed, self._deltas
        self._content, self._completed, self._deltas = [], [], []
        if self.calls and not content.strip():
            content = ""  # whitespace between calls is not content
        return content, calls, deltas


# A call object's string fields before its arguments: `{"tool_call_id": "0", "tool_name": "f", `.
_FIELDS = re.compile(rf'\s*\{{((?:\s*{STRING}\s*:\s*{STRING}\s*,)*)')
_FIELD = re.compile(rf'\s*({STRING})\s*:\s*({STRING})\s*,')


class CallListParser(MarkupCallParser):
    """Calls written as a JSON list of objects after an opener (`[{"name": …, "arguments": {…}}]`),
    up to an optional closer. Each object's arguments stream once its name (and id) are read."""

    closer = ""
    name_key, arguments_key, id_key = "name", "arguments", ""

    def _open(self, opener: str) -> None:
        self._state = "list"  # list | item | object | after
        self._made = 0  # calls made from this list

    def _read(self) -> str | None:
        while True:
            if self._state == "list":
                if not self._skip_blanks():
                    return None
                if not self._literal("["):
                    return TEXT
                self._state = "item"
            elif self._state == "item":
                if not self._skip_blanks():
                    return None
                c = self._pending[0]
                if c in ",]":
                    self._take(1)
                    self._state = "item" if c == "," else "after"
                elif c == "{":
                    self._object, self._object_end = "", JsonEnd()
                    self._head_read = self._skipping = False
                    self._state = "object"
                else:
                    return TEXT if not self._made else DONE
            elif self._state == "object":
                state = self._read_object()
                if state is None or state == TEXT:
                    return state
                self._state = "item"
            else:  # after the list: its closer, where the family writes one
                if not self.closer:
                    return DONE
                if not self._skip_blanks() or self._literal(self.closer) is None:
                    return None
                return DONE

    def _read_object(self) -> str | None:
        """The object's text so far (None: more to come); its arguments stream once its head is read."""
        end = self._object_end.scan(self._pending)
        self._object += self._take(end if end != -1 else len(self._pending))
        if not self._head_read:
            head = self._head()
            if head is not None:
                self._head_read = True
                fields, self._arguments_at = head
                self._arguments_end: JsonEnd | None = JsonEnd()
                if self.name_key not in fields:
                    pass  # written in another order: the whole object decides, at its end
                elif not self._begin(fields[self.name_key], fields.get(self.id_key, "")):
                    if not self._made:
                        return TEXT
                    self._skipping = True
        if self._call is not None and self._arguments_end is not None:
            text = self._object[self._arguments_at:]
            stop = self._arguments_end.scan(text)
            self._stream(text if stop == -1 else text[:stop])
            self._arguments_at = len(self._object)
            if stop != -1:
                self._arguments_end = None  # the rest of the object is not arguments
        return None if end == -1 else self._finish_object()

    def _head(self) -> tuple[dict[str, str], int] | None:
        """The string fields before the arguments, and where the arguments (an object) start."""
        fields = _FIELDS.match(self._object)
        if fields is None:
            return None
        key = re.compile(rf'\s*"{self.arguments_key}"\s*:\s*').match(self._object, fields.end())
        if key is None or key.end() == len(self._object) or self._object[key.end()] != "{":
            return None
        return self._fields(fields.group(1)), key.end()

    def _fields(self, text: str) -> dict[str, str]:
        return {unquote(k): unquote(v) for k, v in _FIELD.findall(text)}

    def _finish_object(self) -> str:
        if self._call is not None:  # streamed: the call is the pieces sent
            self._end_call()
            self._made += 1
            return "item"
        if self._skipping:
            return "item"
        try:
            value = json.loads(self._object)
        except ValueError:
            value = None
        ok = isinstance(value, dict) and value.get(self.name_key) in self.names
        arguments = value.get(self.arguments_key, {}) if isinstance(value, dict) and ok else None
        if not isinstance(arguments, dict):
            return TEXT if not self._made else "item"
        self._begin(value[self.name_key], str(value.get(self.id_key) or "") if self.id_key else "")
        self._stream(json.dumps(arguments, ensure_ascii=False))
        self._end_call()
        self._made += 1
        return "item"

    def flush(self, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        # Cut short before its arguments: the name (and id) read so far make the call.
        if truncated and self._markup is not None and self._state == "object" and not self._head_read:
            fields = _FIELDS.match(self._object)
            named = self._fields(fields.group(1)) if fields else {}
            self._begin(named.get(self.name_key, ""), named.get(self.id_key, ""))
        return super().flush(truncated)


class CallEndsReasoning(ReasoningSplitter):
    """A reasoning block that a call's opener also ends (Qwen3.5, DeepSeek V4: the model may call a
    tool from inside the block the prompt opened, without writing its end marker)."""

    def __init__(self, start: str, end: str, open_: bool, call_openers: tuple[str, ...]) -> None:
        super().__init__(start, end, open_)
        self._openers = call_openers
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        text, self._held = self._held + text, ""
        if not self.inside:
            return super().feed(text)
        ends = [(at, o) for o in self._openers if (at := text.find(o)) != -1]
        closed = text.find(self.end)
        if ends and (closed == -1 or min(ends)[0] < closed):
            at = min(ends)[0]
            reasoning, answer = super().feed(text[:at] + self.end)
            more_reasoning, more = super().feed(text[at:])
            return reasoning + more_reasoning, answer + more
        if closed == -1:
            keep = max(partial_suffix(text, o) for o in self._openers)
            text, self._held = text[:len(text) - keep], text[len(text) - keep:]
        return super().feed(text)

    def flush(self) -> tuple[str, str]:
        reasoning, answer = super().feed(self._held) if self._held else ("", "")
        self._held = ""
        more_reasoning, more = super().flush()
        return reasoning + more_reasoning, answer + more
