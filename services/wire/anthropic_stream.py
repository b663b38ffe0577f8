"""The completion flow's output as Anthropic's Message: content blocks (thinking, text, tool_use),
stop_reason and usage, built once from the chunks and rendered either as one JSON Message or as
Anthropic's server-sent events as the chunks come (`message_start`, then per block
`content_block_start`, its `content_block_delta`s and `content_block_stop`, then `message_delta`
with the stop reason and usage, and `message_stop`).

A block is open while pieces of its kind keep coming: reasoning goes into a thinking block, content
into a text block, a call written piece by piece into a tool_use block whose input travels as
`input_json_delta`s of the arguments' text. A call that was not streamed arrives whole and is sent
as one block with its whole input as one delta.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc

from services.core import json_body
from services.core.structured import ToolCall
from services.inference.engines.base import Chunk, Usage
from services.inference.models.grammars import CallDelta
from services.wire.anthropic import error_json

Event = tuple[str, dict[str, Any]]  # (event name, its data)

# The engine's finish reasons as Anthropic's stop reasons ("stop" depends on what stopped it).
STOP_REASONS = {"length": "max_tokens", "cancelled": "max_tokens", "tool_calls": "tool_use"}
PING: Event = ("ping", {"type": "ping"})


def sse(event: Event) -> bytes:
    """One server-sent event, named as Anthropic names them."""
    name, data = event
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def error_event(code: grpc.StatusCode, message: str) -> Event:
    """An error after the stream started: Anthropic's SDKs raise it as an API error."""
    return "error", error_json(code, message)


def usage_json(usage: Usage | None, *, final: bool = False) -> dict[str, Any]:
    usage = usage or Usage()
    out = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
    if not final:
        out.update(cache_creation_input_tokens=0, cache_read_input_tokens=0)
    return out


def _input(arguments: str) -> dict[str, Any]:
    value = json_body.loads(arguments or "{}", "a tool call's arguments") if arguments else {}
    return value if isinstance(value, dict) else {}


class MessageBuilder:
    """One answer's blocks and stop reason as they are made; `add` returns the events each chunk
    makes (a caller that answers JSON ignores them and reads `message()` at the end)."""

    def __init__(self, model: str, prompt_tokens: int, stop_sequences: tuple[str, ...] = ()) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.stop_sequences = stop_sequences
        self.blocks: list[dict[str, Any]] = []
        self.usage = Usage(prompt_tokens=prompt_tokens)
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self._open: int | None = None  # the index of the block being written
        self._calls: dict[int, int] = {}  # a streamed call's index among the calls → its block
        self._arguments: dict[int, list[str]] = {}  # a tool_use block's input text so far

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    def start(self) -> Event:
        return "message_start", {"type": "message_start", "message": {
            **self._head(), "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage_json(self.usage)}}

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _begin(self, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        self._open = len(self.blocks)
        self.blocks.append(block)
        empty = {**block, "input": {}} if block["type"] == "tool_use" else block
        return events + [("content_block_start", {"type": "content_block_start", "index": self._open,
                                                  "content_block": dict(empty)})]

    def _delta(self, index: int, delta: dict[str, Any]) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}

    def _piece(self, kind: str, text: str) -> list[Event]:
        """Reasoning or content text: it goes on in the open block of its kind, or opens one."""
        if not text:
            return []
        events: list[Event] = []
        if self._open is None or self.blocks[self._open]["type"] != kind:
            events = self._begin({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                                 else {"type": "text", "text": ""})
        assert self._open is not None
        self.blocks[self._open][kind if kind == "thinking" else "text"] += text
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta",
                                                                                       "text": text}
        return events + [self._delta(self._open, delta)]

    def _call_piece(self, delta: CallDelta) -> list[Event]:
        events: list[Event] = []
        if delta.id:
            events = self._begin({"type": "tool_use", "id": delta.id, "name": delta.name, "input": {}})
            assert self._open is not None
            self._calls[delta.index] = self._open
            self._arguments[self._open] = []
        index = self._calls.get(delta.index)
        if index is None or not delta.arguments:
            return events
        self._arguments[index].append(delta.arguments)
        return events + [self._delta(index, {"type": "input_json_delta", "partial_json": delta.arguments})]

    def _call(self, call: ToolCall) -> list[Event]:
        """A finished call: its block gets the whole input (and is sent whole if it was not streamed)."""
        index = next((i for i, b in enumerate(self.blocks) if b["type"] == "tool_use" and b["id"] == call.id), None)
        events: list[Event] = []
        if index is None:
            events = self._begin({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            assert self._open is not None
            index = self._open
            events.append(self._delta(index, {"type": "input_json_delta", "partial_json": call.arguments}))
        self.blocks[index]["input"] = _input(call.arguments)
        return events + (self._close() if self._open == index else [])

    def add(self, chunk: Chunk) -> list[Event]:
        events = self._piece("thinking", chunk.reasoning) + self._piece("text", chunk.text)
        for delta in chunk.call_deltas:
            events += self._call_piece(delta)
        for call in chunk.tool_calls:
            events += self._call(call)
        if chunk.finish_reason is not None:
            events += self._close()
            stopped = chunk.stop_sequence if chunk.stop_sequence in self.stop_sequences else None
            self.stop_sequence = stopped
            self.stop_reason = "stop_sequence" if stopped else STOP_REASONS.get(chunk.finish_reason, "end_turn")
        if chunk.usage is not None:
            self.usage = chunk.usage
            events += [("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": self.stop_reason,
                                                    "stop_sequence": self.stop_sequence},
                                          "usage": usage_json(self.usage, final=True)}),
                       ("message_stop", {"type": "message_stop"})]
        return events

    def message(self) -> dict[str, Any]:
        """The whole Message (once the last chunk is in)."""
        return {**self._head(), "content": self.blocks or [{"type": "text", "text": ""}],
                "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
                "usage": usage_json(self.usage)}
