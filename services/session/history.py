"""A conversation's stored turns as chat messages, and the rules of tool results.

Which turns fit the model's context window is inference's to decide (Generate's HistoryFit keeps the
system prompt and the new turn, and leaves out the oldest whole turns); the session sends its history
and how many of the newest messages belong to the new turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import ToolCall


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str = ""  # a tool message: the call it answers

    def message(self) -> dict[str, Any]:
        """The chat message as services.core.structured sees it."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = list(self.tool_calls)
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def open_calls(past: Sequence[Turn]) -> list[str]:
    """Ids of the latest assistant message's tool calls that no tool message answers yet."""
    latest = next((i for i in range(len(past) - 1, -1, -1) if past[i].role == "assistant"), None)
    if latest is None:
        return []
    answered = {t.tool_call_id for t in past[latest + 1:] if t.role == "tool"}
    return [c.id for c in past[latest].tool_calls if c.id not in answered]


def check_tool_results(past: Sequence[Turn], call_ids: Sequence[str]) -> None:
    """INVALID_ARGUMENT naming the first id that does not answer an open call of the latest answer
    (or answers one twice)."""
    open_ids = set(open_calls(past))
    seen: set[str] = set()
    for i, call_id in enumerate(call_ids):
        if not call_id:
            raise InvalidArgument(f"tool_results[{i}].tool_call_id must not be empty")
        if call_id in seen:
            raise InvalidArgument(f"tool_results[{i}] answers the call {call_id!r} a second time")
        if call_id not in open_ids:
            raise InvalidArgument(f"tool_results[{i}].tool_call_id {call_id!r} answers no unanswered tool call "
                                  "of the latest assistant message")
        seen.add(call_id)


def consistent(past: Sequence[Turn]) -> list[Turn]:
    """`past` without tool messages that answer no call made before them (a deleted response's
    calls): a chat that holds one is not valid to send."""
    called: set[str] = set()
    kept = []
    for turn in past:
        if turn.role == "tool" and turn.tool_call_id not in called:
            continue
        called.update(c.id for c in turn.tool_calls)
        kept.append(turn)
    return kept


def title_from(content: str, limit: int = 60) -> str:
    """A session title from its first message: the first line, cut at a word boundary."""
    line = next((ln.strip() for ln in content.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,.;:-") + "…"


# The most history a turn sends inference, in characters of content: more than any context window
# holds, and within gRPC's message limit (services.core.server.MAX_MESSAGE_BYTES) even at 4 bytes each.
MAX_SENT_CHARS = 3_000_000


def newest(turns: Sequence[Turn], limit: int, chars: int = MAX_SENT_CHARS) -> list[Turn]:
    """At most the `limit` newest turns holding at most `chars` characters, starting with a question
    (inference leaves out more when they do not fit the model's context window:
    services.inference.flow.fitting)."""
    start, held = len(turns), 0
    while start > 0 and len(turns) - start < limit and held + len(turns[start - 1].content) <= chars:
        start -= 1
        held += len(turns[start].content)
    if start == 0:
        return list(turns)
    while start < len(turns) and turns[start].role != "user":
        start += 1
    return list(turns[start:])
