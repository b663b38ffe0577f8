"""History trimming and titles: what reaches the model when a conversation outgrows its context."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.core.structured import ToolCall
from services.session.history import Turn, check_tool_results, fit, open_calls, title_from


def turns(*roles: str) -> list[Turn]:
    return [Turn(role, f"{role}{i}") for i, role in enumerate(roles)]


def test_everything_fits() -> None:
    messages = turns("system", "user", "assistant", "user")
    kept, used = fit(messages, [10, 5, 5, 5], 30, budget=100, has_system=True)
    assert kept == messages and used == 30


def test_oldest_turns_go_first_and_system_prompt_stays() -> None:
    messages = turns("system", "user", "assistant", "user", "assistant", "user")
    # overhead 5: total = 5 + 10 + 4 * 20 + 7
    kept, used = fit(messages, [10, 20, 20, 20, 20, 7], 102, budget=70, has_system=True)
    assert [t.content for t in kept] == ["system0", "user3", "assistant4", "user5"]
    assert used == 5 + 10 + 20 + 20 + 7


def test_kept_history_never_starts_with_an_answer() -> None:
    messages = turns("user", "assistant", "user", "assistant", "user")
    # Room for the new message plus two more: that would be assistant3 + user2... walk-back keeps
    # [user2, assistant3, user4] only if all fit; with room for one more it must drop assistant3 too.
    kept, used = fit(messages, [10, 10, 10, 10, 10], 50, budget=20, has_system=False)
    assert [t.content for t in kept] == ["user4"] and used == 10


def test_new_message_too_long_is_a_clear_400() -> None:
    with pytest.raises(InvalidArgument, match="needs 120 tokens"):
        fit(turns("system", "user"), [20, 100], 120, budget=100, has_system=True)


def called(*ids: str) -> Turn:
    return Turn("assistant", "", tuple(ToolCall(i, "get_weather", "{}") for i in ids))


def test_tool_results_stay_with_the_answer_they_answer_and_history_never_starts_with_one() -> None:
    messages = [Turn("user", "q0"), called("c0"), Turn("tool", "r0", tool_call_id="c0"), Turn("assistant", "a0"),
                Turn("user", "q1"), called("c1"), Turn("tool", "r1", tool_call_id="c1")]
    # The new turn is the last answer and its result (pinned); room for two more messages would
    # start the history at a tool result, then at an answer: both are dropped.
    kept, used = fit(messages, [10] * 7, 70, budget=50, has_system=False, new=2)
    assert [t.content or t.role for t in kept] == ["q1", "assistant", "r1"] and used == 30
    kept, _ = fit(messages, [10] * 7, 70, budget=70, has_system=False, new=2)
    assert kept == messages
    with pytest.raises(InvalidArgument, match="needs 20 tokens"):
        fit(messages, [10] * 7, 70, budget=19, has_system=False, new=2)


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
