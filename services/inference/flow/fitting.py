"""Which part of a long chat goes to the model: the newest turns that fit its context window.

The system prompt (a first system message) and the newest `keep_last` messages (the new turn; with
tool results, the answer whose calls they answer too) are always kept. The oldest history goes
first, a whole turn at a time, so the kept history never starts with an answer whose question was
cut, nor with a tool result whose call was cut.

The engine renders and tokenizes the whole chat once; only a chat that does not fit is estimated
per message (each content's tokens, counted once and cached, plus an even share of the template's
own tokens) to choose where to cut, and the cut chat is rendered again to check. An estimate that
was short cuts one more turn and checks again, so the result always fits; one that was long takes
turns back while they fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import characters

Render = Callable[[Sequence[dict[str, Any]]], list[int]]  # a chat -> its prompt tokens


@dataclass(frozen=True)
class Fit:
    """What the caller asks (the contract's HistoryFit)."""

    keep_last: int = 1  # the newest messages always kept: the new turn
    reserve_tokens: int = 0  # room for the answer when max_tokens is unset (0: the default max_tokens), at most a quarter of the context


@dataclass(frozen=True)
class Fitted:
    tokens: list[int]  # the prompt
    dropped: int  # history messages left out


def budget(context: int, max_tokens: int | None, reserve_tokens: int) -> int:
    """Prompt tokens allowed once room for the answer is kept: max_tokens when given, else the
    reserve (at most a quarter of the context window)."""
    room = max_tokens if max_tokens else min(reserve_tokens, context // 4)
    if room >= context:
        raise InvalidArgument(f"max_tokens is {room} but the model has a context window of {context} tokens")
    return context - room


def check_characters(messages: Sequence[dict[str, Any]], prompt: str, limit: int, what: str) -> None:
    """Refuses, before anything renders it, a request that cannot fit the model (more than `limit`
    characters, set by `what`): its tokens would take longer to count than any answer is worth."""
    held = len(prompt) + sum(characters(m) for m in messages)
    if held > limit:
        raise InvalidArgument(f"the request holds {held} characters; at most {limit} are accepted ({what})")


def within_characters(messages: Sequence[dict[str, Any]], keep_last: int, limit: int,
                      what: str) -> tuple[list[dict[str, Any]], int]:
    """The chat with its oldest turns left out until its messages hold at most `limit` characters,
    and how many were left out: a cut made before anything renders or tokenizes, linear in the
    characters, so that a long history costs no more than the newest part that can matter. Raises
    INVALID_ARGUMENT (naming `what` the limit is) when the system prompt and the newest `keep_last`
    messages alone hold more."""
    sizes = [characters(m) for m in messages]
    total = sum(sizes)
    if total <= limit:
        return list(messages), 0
    first = 1 if messages and messages[0]["role"] == "system" else 0
    start = max(first, len(messages) - max(1, keep_last))
    cut = first
    while cut < start and (total > limit or messages[cut]["role"] != "user"):
        total -= sizes[cut]
        cut += 1
    if total > limit:
        raise InvalidArgument(f"the newest message and the system prompt hold {total} characters; at most {limit} "
                              f"are accepted ({what})")
    return [*messages[:first], *messages[cut:]], cut - first


def fit(messages: Sequence[dict[str, Any]], keep_last: int, allowed: int, render: Render,
        shares: Callable[[Sequence[dict[str, Any]], int], list[int]]) -> Fitted:
    """The prompt of `messages` with the oldest turns left out until it is at most `allowed` tokens.

    `render` gives a chat's prompt tokens; `shares(messages, total)` estimates each message's part of
    a total of `total` tokens. Raises INVALID_ARGUMENT when the system prompt and the newest
    `keep_last` messages alone do not fit."""
    tokens = render(messages)
    if len(tokens) <= allowed:
        return Fitted(tokens, 0)  # the usual case: one render, one tokenization
    first = 1 if messages and messages[0]["role"] == "system" else 0
    start = max(first, len(messages) - max(1, keep_last))  # where the kept newest messages begin
    estimate = shares(messages, len(tokens))
    cut = first  # history messages [first, cut) are left out
    while True:
        excess = len(tokens) - allowed
        while cut < start and excess > 0:
            excess -= estimate[cut]
            cut += 1
        while cut < start and messages[cut]["role"] != "user":
            cut += 1  # never start the kept history with an answer or a tool result
        tokens = render([*messages[:first], *messages[cut:]])
        if len(tokens) <= allowed:
            break
        if cut >= start:
            raise InvalidArgument(
                f"the message needs {len(tokens)} tokens with the system prompt, but only {allowed} of the "
                "model's context window are left once room for the answer is kept; shorten it")
        # The estimate fell short: the next round cuts at least one more message.
    # An estimate that was too large cut too much: take back whole turns while they fit.
    while (back := _previous_question(messages, first, cut)) is not None \
            and len(tokens) + sum(estimate[back:cut]) <= allowed:
        more = render([*messages[:first], *messages[back:]])
        if len(more) > allowed:
            break
        tokens, cut = more, back
    return Fitted(tokens, cut - first)


def kept(messages: Sequence[dict[str, Any]], dropped: int) -> Sequence[dict[str, Any]]:
    """The chat that `fit` kept when it left out `dropped` history messages: the system prompt, then
    the newest messages (for engines that take the chat rather than its tokens)."""
    if not dropped:
        return messages
    first = 1 if messages and messages[0]["role"] == "system" else 0
    return [*messages[:first], *messages[first + dropped:]]


def _previous_question(messages: Sequence[dict[str, Any]], first: int, cut: int) -> int | None:
    """The latest user message before `cut` (and not before `first`)."""
    return next((i for i in range(cut - 1, first - 1, -1) if messages[i]["role"] == "user"), None)
