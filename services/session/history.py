"""Which part of a conversation goes to the model: the newest turns that fit its context window.

Tokens are counted by inference with the model's own tokenizer and chat template (CountTokens gives
each message's share). The system prompt and the new turn are always kept (with tool results, the
new turn includes the answer whose calls they answer); the oldest turns go first, a whole turn at a
time, so the history never starts with an answer whose question was cut, nor with a tool result
whose call was cut.
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


def title_from(content: str, limit: int = 60) -> str:
    """A session title from its first message: the first line, cut at a word boundary."""
    line = next((ln.strip() for ln in content.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,.;:-") + "…"


def fit(messages: Sequence[Turn], message_tokens: Sequence[int], total_tokens: int, budget: int,
        has_system: bool, new: int = 1) -> tuple[list[Turn], int]:
    """The messages to send and their token count (with the template's overhead).

    `messages` is [system?] + history + the new turn, its last `new` messages; `message_tokens`
    gives each one's share of `total_tokens`. Raises INVALID_ARGUMENT when even the system prompt
    and the new turn alone exceed `budget`.
    """
    if len(messages) != len(message_tokens):
        raise ValueError("one token count per message")
    first = 1 if has_system else 0
    start = len(messages) - new  # where the new turn begins
    if not first <= start < len(messages):
        raise ValueError("the new turn must hold at least one message after the system prompt")
    fixed = total_tokens - sum(message_tokens[first:start])  # system, new turn, template overhead
    if fixed > budget:
        raise InvalidArgument(
            f"the message needs {fixed} tokens with the system prompt, but only {budget} of the model's "
            f"context window are left once room for the answer is kept; shorten it")
    keep_from = start
    used = fixed
    # Walk back from the newest history message while it fits.
    while keep_from > first and used + message_tokens[keep_from - 1] <= budget:
        keep_from -= 1
        used += message_tokens[keep_from]
    # Never start the kept history with an answer or a tool result: only with a question.
    while keep_from < start and messages[keep_from].role != "user":
        used -= message_tokens[keep_from]
        keep_from += 1
    return [*messages[:first], *messages[keep_from:]], used
