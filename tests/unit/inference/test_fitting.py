"""Fitting a long chat to the context window (services.inference.flow.fitting), with a counting renderer:
each message's content names its token count, and the template adds 5 tokens."""

from __future__ import annotations

from typing import Any

import pytest

from services.core.errors import InvalidArgument
from services.inference.flow.fitting import budget, fit

OVERHEAD = 5


class Renderer:
    def __init__(self, tokens: dict[str, int]) -> None:
        self.tokens = tokens
        self.renders = 0

    def __call__(self, chat: list[dict[str, Any]]) -> list[int]:
        self.renders += 1
        return [0] * (OVERHEAD + sum(self.tokens[m["content"]] for m in chat))

    def exact(self, messages: list[dict[str, Any]], total: int) -> list[int]:
        return [self.tokens[m["content"]] for m in messages]

    @staticmethod
    def one_each(messages: list[dict[str, Any]], total: int) -> list[int]:
        """An estimate far too small: every message a single token."""
        return [1] * len(messages)

    @staticmethod
    def too_large(messages: list[dict[str, Any]], total: int) -> list[int]:
        """An estimate far too large."""
        return [total] * len(messages)


def chat(*spec: tuple[str, int]) -> tuple[list[dict[str, Any]], Renderer]:
    messages = [{"role": role, "content": f"{role}{i}"} for i, (role, _) in enumerate(spec)]
    return messages, Renderer({m["content"]: n for m, (_, n) in zip(messages, spec)})


def contents(messages: list[dict[str, Any]], dropped: int, first: int = 1) -> list[str]:
    return [m["content"] for m in [*messages[:first], *messages[first + dropped:]]]


def test_a_chat_that_fits_is_rendered_once_and_kept_whole() -> None:
    messages, render = chat(("system", 10), ("user", 5), ("assistant", 5), ("user", 5))
    fitted = fit(messages, 1, 100, render, render.exact)
    assert len(fitted.tokens) == 30 and fitted.dropped == 0 and render.renders == 1


@pytest.mark.parametrize("estimate", ["exact", "one_each", "too_large"])
def test_oldest_turns_go_first_and_the_system_prompt_stays(estimate: str) -> None:
    messages, render = chat(("system", 10), ("user", 20), ("assistant", 20), ("user", 20), ("assistant", 20),
                            ("user", 7))
    fitted = fit(messages, 1, 70, render, getattr(render, estimate))
    assert fitted.dropped == 2 and len(fitted.tokens) == OVERHEAD + 10 + 20 + 20 + 7
    if estimate == "exact":
        assert render.renders == 2  # the whole chat, then the cut one
    else:
        assert render.renders <= 4  # a poor estimate costs a render per turn it misjudged, no more


def test_kept_history_never_starts_with_an_answer() -> None:
    messages, render = chat(("user", 10), ("assistant", 10), ("user", 10), ("assistant", 10), ("user", 10))
    # Room for the new message and one more: that one would be an answer, so it goes too.
    fitted = fit(messages, 1, 25, render, render.exact)
    assert contents(messages, fitted.dropped, first=0) == ["user4"] and len(fitted.tokens) == 15


def test_a_new_turn_too_long_even_alone_is_a_400_naming_both_counts() -> None:
    messages, render = chat(("system", 20), ("user", 30), ("user", 100))
    with pytest.raises(InvalidArgument, match="needs 125 tokens .* only 100 of"):
        fit(messages, 1, 100, render, render.exact)


def test_tool_results_stay_with_the_answer_they_answer() -> None:
    messages, render = chat(("user", 10), ("assistant", 10), ("tool", 10), ("assistant", 10), ("user", 10),
                            ("assistant", 10), ("tool", 10))
    # The new turn is the last answer and its result (keep_last 2); room for two more messages would
    # start the history at a tool result, then at an answer: both go.
    fitted = fit(messages, 2, 55, render, render.exact)
    assert contents(messages, fitted.dropped, first=0) == ["user4", "assistant5", "tool6"]
    assert fit(messages, 2, 75, render, render.exact).dropped == 0
    with pytest.raises(InvalidArgument, match="needs 25 tokens"):
        fit(messages, 2, 24, render, render.exact)


def test_the_room_for_the_answer() -> None:
    assert budget(2048, 100, 512) == 1948  # max_tokens given
    assert budget(2048, None, 300) == 1748  # the reserve
    assert budget(1024, None, 512) == 768  # at most a quarter of the context
    with pytest.raises(InvalidArgument, match="max_tokens is 4096 but the model has a context window of 2048"):
        budget(2048, 4096, 512)


def test_a_chat_over_the_character_limit_loses_its_oldest_whole_turns_before_anything_renders() -> None:
    from services.inference.flow.fitting import within_characters

    messages = [{"role": "system", "content": "s" * 10}]
    for i in range(5):
        messages += [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "a" * 100}]
    messages.append({"role": "user", "content": "new" * 10})
    assert within_characters(messages, 1, 10_000, "the limit") == (messages, 0)
    kept, dropped = within_characters(messages, 1, 450, "the limit")
    assert dropped == 6 and kept == [messages[0], *messages[7:]]  # the newest two turns fit, whole
    assert kept[1]["role"] == "user"
    with pytest.raises(InvalidArgument, match=r"hold 40 characters; at most 39 are accepted \(the limit\)"):
        within_characters(messages, 1, 39, "the limit")
