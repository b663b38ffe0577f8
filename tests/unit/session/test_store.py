"""SqlSessionStore: ownership, ordering, paging cursors, turns, turn leases and migrations, on both
backends (real SQLite files and a real PostgreSQL) where the behaviour is the same."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.core.database import Location
from services.core.errors import NotFound
from services.core.sqlite import SqliteDatabase
from services.core.structured import ToolCall
from services.session.records import STATUS_COMPLETE, STATUS_ERROR, STATUS_INCOMPLETE, SessionCursor, SessionDraft
from services.session.store import MIGRATIONS
from services.session.store import SqlSessionStore as SqliteSessionStore


@pytest.fixture
def store(database: Location) -> Iterator[SqliteSessionStore]:
    s = SqliteSessionStore(database)
    yield s
    s.close()


def new(store: SqliteSessionStore, owner: str = "alice", title: str = "") -> str:
    return store.create_session(owner, title=title, model="", system_prompt="", sampling={}).id


def test_wal_mode_schema_version_and_private_file(tmp_path: Path) -> None:
    store = SqliteSessionStore(tmp_path / "s.db")
    assert store.schema_version() == len(MIGRATIONS)
    store.close()
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Reopening does not re-run migrations (they would fail on existing tables).
    SqliteSessionStore(tmp_path / "s.db").close()


def test_another_owner_gets_not_found_for_everything(store: SqliteSessionStore) -> None:
    sid = new(store, "alice")
    store.start_turn("alice", sid, "hello", "m", "hello")
    for call in (
        lambda: store.get_session("bob", sid),
        lambda: store.update_session("bob", sid, {"title": "mine now"}),
        lambda: store.delete_session("bob", sid),
        lambda: store.list_messages("bob", sid),
        lambda: store.start_turn("bob", sid, "hi", "m", "hi"),
    ):
        with pytest.raises(NotFound) as caught:
            call()
        # Same words as for a session that never existed.
        assert str(caught.value) == str(NotFound(f"session {sid!r} not found"))
    assert store.get_session("alice", sid).title == "hello"
    assert [m.content for m in store.list_messages("alice", sid)] == ["hello", ""]
    assert store.list_sessions("bob", 10, None) == []


def test_sessions_newest_activity_first_with_stable_cursor(store: SqliteSessionStore) -> None:
    ids = [new(store, title=f"s{i}") for i in range(5)]
    store.start_turn("alice", ids[1], "bump", "m", "")  # now the most recent
    first = store.list_sessions("alice", 2, None)
    assert [s.id for s in first] == [ids[1], ids[4]]
    rest = store.list_sessions("alice", 10, SessionCursor(first[-1].updated_at, first[-1].id))
    assert [s.id for s in rest] == [ids[3], ids[2], ids[0]]


def test_turn_stores_both_messages_sets_title_once_and_answer_updates(store: SqliteSessionStore) -> None:
    sid = new(store)
    user, answer = store.start_turn("alice", sid, "What is 2+2?", "m", "What is 2+2?")
    assert (user.role, user.status, answer.role, answer.status) == ("user", STATUS_COMPLETE, "assistant", STATUS_INCOMPLETE)
    store.save_answer(answer.id, content="4", status=STATUS_COMPLETE, prompt_tokens=9, completion_tokens=1)
    store.start_turn("alice", sid, "and 3+3?", "m", "and 3+3?")
    assert store.get_session("alice", sid).title == "What is 2+2?"
    messages = store.list_messages("alice", sid)
    assert [(m.role, m.content, m.status) for m in messages] == [
        ("user", "What is 2+2?", STATUS_COMPLETE), ("assistant", "4", STATUS_COMPLETE),
        ("user", "and 3+3?", STATUS_COMPLETE), ("assistant", "", STATUS_INCOMPLETE)]
    assert (messages[1].prompt_tokens, messages[1].completion_tokens) == (9, 1)
    # Paging by sequence.
    assert [m.content for m in store.list_messages("alice", sid, 2, messages[1].seq)] == ["and 3+3?", ""]


def test_update_and_delete_cascade(store: SqliteSessionStore) -> None:
    sid = new(store)
    store.start_turn("alice", sid, "hi", "m", "hi")
    updated = store.update_session("alice", sid, {"title": "Renamed", "sampling": {"temperature": 0.2}})
    assert (updated.title, dict(updated.sampling)) == ("Renamed", {"temperature": 0.2})
    store.delete_session("alice", sid)
    with pytest.raises(NotFound):
        store.get_session("alice", sid)
    assert store.db.read("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    with pytest.raises(NotFound):
        store.delete_session("alice", sid)


def test_error_answer_keeps_partial_text(store: SqliteSessionStore) -> None:
    sid = new(store)
    _, answer = store.start_turn("alice", sid, "tell me", "m", "tell me")
    store.save_answer(answer.id, content="Once upon", status=STATUS_ERROR, error="UNAVAILABLE: gone")
    stored = store.list_messages("alice", sid)[-1]
    assert (stored.content, stored.status, stored.error) == ("Once upon", STATUS_ERROR, "UNAVAILABLE: gone")


def test_migration_from_version_1_keeps_old_rows_and_adds_tool_columns(tmp_path: Path) -> None:
    path = tmp_path / "session.db"
    old = SqliteDatabase(path, MIGRATIONS[:1])
    with old.transaction() as db:
        db.execute("INSERT INTO sessions VALUES ('s1', 'alice', 'Old', '', '', '{}', 1.0, 2.0)")
        db.execute("INSERT INTO messages (id, session_id, role, content, model, status, created_at) "
                   "VALUES ('m1', 's1', 'user', 'hello from v1', 'm', 'complete', 1.5)")
    old.close()

    store = SqliteSessionStore(path)
    assert store.schema_version() == len(MIGRATIONS)
    [message] = store.list_messages("alice", "s1")
    assert (message.content, message.tool_calls, message.tool_call_id) == ("hello from v1", (), "")
    # The old session takes tool turns like a new one.
    _, answer = store.start_turn("alice", "s1", "weather?", "m", "")
    store.save_answer(answer.id, content="", status=STATUS_COMPLETE, tool_calls=[ToolCall("call_1", "f", "{}")])
    assert store.list_messages("alice", "s1")[-1].tool_calls == (ToolCall("call_1", "f", "{}"),)
    store.close()


def test_tool_turn_stores_results_before_the_user_message(store: SqliteSessionStore) -> None:
    sid = new(store, title="Weather")
    _, asked = store.start_turn("alice", sid, "Weather in Oslo and Rome?", "m", "")
    calls = [ToolCall("call_a", "get_weather", '{"city": "Oslo"}'), ToolCall("call_b", "get_weather", '{"city": "Rome"}')]
    store.save_answer(asked.id, content="", status=STATUS_COMPLETE, completion_tokens=30, tool_calls=calls)

    # Results only: no user message.
    turn = store.start_turn("alice", sid, "", "m", "", tool_results=[("call_a", "12 C"), ("call_b", "25 C")])
    assert turn.user is None
    assert [(t.role, t.content, t.tool_call_id) for t in turn.tools] == [("tool", "12 C", "call_a"), ("tool", "25 C", "call_b")]
    user, answer = turn  # unpacks like a turn without tools
    assert user is None and answer is turn.answer
    stored = store.list_messages("alice", sid)
    assert [(m.role, m.content, m.tool_call_id) for m in stored] == [
        ("user", "Weather in Oslo and Rome?", ""), ("assistant", "", ""),
        ("tool", "12 C", "call_a"), ("tool", "25 C", "call_b"), ("assistant", "", "")]
    assert stored[1].tool_calls == tuple(calls) and stored[4].tool_calls == ()
    assert [m.id for m in stored[2:]] == [t.id for t in turn.tools] + [turn.answer.id]

    # Results and a question: tool messages first, then the user message.
    turn = store.start_turn("alice", sid, "Thanks. And Paris?", "m", "", tool_results=[("call_c", "18 C")])
    assert turn.user is not None
    assert [m.role for m in store.list_messages("alice", sid)[5:]] == ["tool", "user", "assistant"]
    assert store.get_session("alice", sid).title == "Weather"


def test_one_turn_lease_per_session_until_released_or_expired(store: SqliteSessionStore) -> None:
    sid, other = new(store), new(store)
    assert store.acquire_turn(sid, "replica-a", 30)
    assert not store.acquire_turn(sid, "replica-b", 30)  # held
    assert store.acquire_turn(other, "replica-b", 30)  # another session is free
    assert store.renew_turn(sid, "replica-a", 30) and not store.renew_turn(sid, "replica-b", 30)
    store.release_turn(sid, "replica-b")  # not its lease: nothing happens
    assert not store.acquire_turn(sid, "replica-b", 30)
    store.release_turn(sid, "replica-a")
    assert store.acquire_turn(sid, "replica-b", 0.2)
    time.sleep(0.3)  # replica-b died: its lease expires and can be taken over
    assert store.acquire_turn(sid, "replica-c", 30)
    assert not store.renew_turn(sid, "replica-b", 30)
    store.delete_session("alice", sid)  # the lease goes with the session
    assert store.db.read("SELECT COUNT(*) AS n FROM turn_leases WHERE session_id = ?", (sid,))[0]["n"] == 0


def test_racing_replicas_get_exactly_one_lease(database: Location) -> None:
    """Eight stores (eight pools or connections: replicas) race for one session's lease, ten times."""
    stores = [SqliteSessionStore(database) for _ in range(8)]
    try:
        sessions = [new(stores[0]) for _ in range(10)]
        with ThreadPoolExecutor(8) as pool:
            for sid in sessions:
                won = list(pool.map(lambda i: stores[i].acquire_turn(sid, f"replica-{i}", 30), range(8)))
                assert won.count(True) == 1, won
    finally:
        for s in stores:
            s.close()


# --- the Responses API: a response is an assistant message with its request beside it ----------------

def test_responses_start_sessions_append_fork_and_delete(store: SqliteSessionStore) -> None:
    from services.session.history import Turn

    call = ToolCall("call_1", "f", "{}")
    inputs = [Turn("user", "Hi"), Turn("assistant", "", (call,)), Turn("tool", "42", tool_call_id="call_1")]
    first = store.start_response("alice", "", inputs, "m", {"instructions": "x"},
                                 draft=SessionDraft(id="s-new", title="Hi", model="m", system_prompt="x"))
    assert first.answer.session_id == "s-new" and store.get_session("alice", "s-new").system_prompt == "x"
    store.save_answer(first.answer.id, content="Done.", status=STATUS_COMPLETE)
    store.finish_response(first.answer.id, "FINISH_REASON_STOP")
    found = store.get_response("alice", first.answer.id)
    assert (found.session.id, found.message.content, found.request, found.input_count, found.finish_reason) == (
        "s-new", "Done.", {"instructions": "x"}, 3, "FINISH_REASON_STOP")
    assert [(m.role, m.tool_calls) for m in store.response_inputs("alice", first.answer.id)] == [
        ("user", ()), ("assistant", (call,)), ("tool", ())]

    second = store.start_response("alice", "s-new", [Turn("user", "More")], "m", {})
    assert [m.content for m in store.response_inputs("alice", second.answer.id)] == ["More"]
    fork = store.start_response("alice", "", [Turn("user", "Else")], "m", {}, draft=SessionDraft(
        title="Hi", model="m", source="s-new", through_seq=found.message.seq))
    forked = store.list_messages("alice", fork.answer.session_id)
    assert [m.content for m in forked] == ["Hi", "", "42", "Done.", "Else", ""]
    assert forked[1].tool_calls == (call,) and not {m.id for m in forked} & {
        m.id for m in store.list_messages("alice", "s-new")}
    assert len(store.list_messages("alice", "s-new")) == 6  # the original, untouched

    # A chat turn's answer is a response too; its input is what came after the previous answer.
    turn = store.start_turn("alice", "s-new", "Chat", "m", "")
    assert store.get_response("alice", turn.answer.id).request is None
    assert [m.content for m in store.response_inputs("alice", turn.answer.id)] == ["Chat"]

    for owner, message_id in (("bob", first.answer.id), ("alice", "nope"), ("alice", turn.user.id)):
        with pytest.raises(NotFound):
            store.get_response(owner, message_id)
    with pytest.raises(NotFound):
        store.delete_response("bob", first.answer.id)
    with pytest.raises(NotFound):
        store.start_response("bob", "s-new", [Turn("user", "x")], "m", {})
    with pytest.raises(NotFound):
        store.start_response("bob", "", [Turn("user", "x")], "m", {}, draft=SessionDraft(
            title="", model="", source="s-new", through_seq=found.message.seq))

    store.delete_response("alice", second.answer.id)
    assert [m.content for m in store.list_messages("alice", "s-new")] == ["Hi", "", "42", "Done.", "Chat", ""]
    store.delete_response("alice", fork.answer.id)
    assert len(store.list_messages("alice", fork.answer.session_id)) == 4  # the copied history stays
    store.delete_response("alice", turn.answer.id)
    store.delete_response("alice", first.answer.id)
    with pytest.raises(NotFound):  # the session left empty goes too
        store.get_session("alice", "s-new")


def test_an_answer_keeps_its_reasoning_apart_and_a_fork_copies_it(store: SqliteSessionStore) -> None:
    from services.session.history import Turn

    sid = new(store)
    _, answer = store.start_turn("alice", sid, "Hi", "m", "Hi")
    store.save_answer(answer.id, content="Hello!", status=STATUS_COMPLETE, completion_tokens=9,
                      reasoning="The user greets.", reasoning_tokens=5)
    stored = store.list_messages("alice", sid)[-1]
    assert (stored.content, stored.reasoning, stored.reasoning_tokens) == ("Hello!", "The user greets.", 5)
    fork = store.start_response("alice", "", [Turn("user", "Else")], "m", {}, draft=SessionDraft(
        title="Hi", model="m", source=sid, through_seq=stored.seq))
    copied = store.list_messages("alice", fork.answer.session_id)[1]
    assert (copied.content, copied.reasoning, copied.reasoning_tokens) == ("Hello!", "The user greets.", 5)


def test_migration_to_reasoning_keeps_earlier_answers_without_any(tmp_path: Path) -> None:
    path = tmp_path / "session.db"
    old = SqliteDatabase(path, MIGRATIONS[:4])
    with old.transaction() as db:
        db.execute("INSERT INTO sessions VALUES ('s1', 'alice', 'Old', '', '', '{}', 1.0, 2.0)")
        db.execute("INSERT INTO messages (id, session_id, role, content, model, status, created_at) "
                   "VALUES ('m1', 's1', 'assistant', 'an old answer', 'm', 'complete', 1.5)")
    old.close()
    store = SqliteSessionStore(path)
    assert store.schema_version() == len(MIGRATIONS) == 5
    [message] = store.list_messages("alice", "s1")
    assert (message.content, message.reasoning, message.reasoning_tokens) == ("an old answer", "", 0)
    store.close()
