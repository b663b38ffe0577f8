"""Which part of a conversation goes to the model: the newest turns that fit its context window.

Tokens are counted by inference with the model's own tokenizer and chat template (CountTokens gives
each message's share). The system prompt and the new message are always kept; the oldest turns go
first, a whole turn at a time, so the history never starts with an answer whose question was cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.core.errors import InvalidArgument


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def title_from(content: str, limit: int = 60) -> str:
    """A session title from its first message: the first line, cut at a word boundary."""
    line = next((ln.strip() for ln in content.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,.;:-") + "…"


def fit(messages: Sequence[Turn], message_tokens: Sequence[int], total_tokens: int, budget: int,
        has_system: bool) -> tuple[list[Turn], int]:
    """The messages to send and their token count (with the template's overhead).

    `messages` is [system?] + history + [new message]; `message_tokens` gives each one's share of
    `total_tokens`. Raises INVALID_ARGUMENT when even the system prompt and the new message alone
    exceed `budget`.
    """
    if len(messages) != len(message_tokens):
        raise ValueError("one token count per message")
    first = 1 if has_system else 0
    fixed = total_tokens - sum(message_tokens[first:-1])  # system, new message, template overhead
    if fixed > budget:
        raise InvalidArgument(
            f"the message needs {fixed} tokens with the system prompt, but only {budget} of the model's "
            f"context window are left once room for the answer is kept; shorten it")
    keep_from = len(messages) - 1
    used = fixed
    # Walk back from the newest history message while it fits.
    while keep_from > first and used + message_tokens[keep_from - 1] <= budget:
        keep_from -= 1
        used += message_tokens[keep_from]
    # Never start the kept history with an answer.
    while keep_from < len(messages) - 1 and messages[keep_from].role != "user":
        used -= message_tokens[keep_from]
        keep_from += 1
    return [*messages[:first], *messages[keep_from:]], used
