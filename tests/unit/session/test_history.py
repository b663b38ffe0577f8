"""A conversation's history as messages, the rules of tool results, and titles."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.core.structured import ToolCall
from services.session.history import Turn, check_tool_results, newest, open_calls, title_from


def turns(*roles: str) -> list[Turn]:
    return [Turn(role, f"{role}{i}") for i, role in enumerate(roles)]


def test_newest_keeps_a_bounded_history_that_starts_with_a_question() -> None:
    history = turns("user", "assistant", "user", "assistant", "user", "assistant")
    assert newest(history, 10) == history
    assert [t.content for t in newest(history, 3)] == ["user4", "assistant5"]
    assert [t.content for t in newest(history, 4)] == ["user2", "assistant3", "user4", "assistant5"]
    assert newest(history, 0) == []
    assert [t.content for t in newest(history, 10, chars=len("user4assistant5"))] == ["user4", "assistant5"]


def called(*ids: str) -> Turn:
    return Turn("assistant", "", tuple(ToolCall(i, "get_weather", "{}") for i in ids))


def test_tool_results_must_answer_open_calls_of_the_latest_answer() -> None:
    past = [Turn("user", "q"), called("old"), Turn("tool", "r", tool_call_id="old"), Turn("user", "q2"),
            called("a", "b"), Turn("tool", "ra", tool_call_id="a")]
    assert open_calls(past) == ["b"]
    check_tool_results(past, ["b"])
    for ids, words in [(["old"], "'old' answers no unanswered"), (["a"], "'a' answers no unanswered"),
                       (["zzz"], "tool_results\\[0\\].tool_call_id 'zzz'"), (["b", "b"], "second time"),
                       ([""], "must not be empty")]:
        with pytest.raises(InvalidArgument, match=words):
            check_tool_results(past, ids)
    assert open_calls([Turn("user", "q")]) == [] and open_calls([*past, Turn("assistant", "done")]) == []


def test_titles() -> None:
    assert title_from("  \n  What is the capital of France?\nMore text") == "What is the capital of France?"
    long = "Explain " + "very " * 30 + "carefully"
    title = title_from(long)
    assert len(title) <= 61 and title.endswith("…") and not title.endswith(" …")
    assert title_from("a" * 100).startswith("a" * 60)
