"""Where conversations live: the SQL implementation of the SessionStore interface
(services.session.records), which runs on SQLite (one file, one replica) or PostgreSQL
(PARLEY_DATABASE_URL, any number of replicas) through services.core.database. Every method that
takes an `owner` only ever sees that owner's rows: a session of someone else is NOT_FOUND, exactly
as a session that does not exist.

A turn stores, in one transaction: the tool messages that answer the previous answer's calls, the
user's message, and the assistant's (empty, incomplete) message; an assistant message keeps the tool
calls it made, and a reasoning model's reasoning apart from its content.

A Responses API response (services/session/responses.py) is an assistant message too: start_response
stores, in one transaction, the session it starts (new, or a fork holding a copy of another's history),
the request's input as messages, the empty answer, and the request beside it (table responses).

One turn at a time per session, across replicas: a turn holds the session's lease (turn_leases), a
row with a holder and an expiry that the holder renews while the answer streams. Taking it is one
conditional upsert, so of two replicas racing for it exactly one wins; a replica that dies stops
renewing and its lease expires (services/session/turns.py). On SQLite one process owns the file,
so the leases live in that process's memory (shared by every store on the file) and a turn costs no
extra disk write: each would be an fsync on the way to the first token.

Ordering: sessions newest activity first (update_time, then id, descending); messages oldest first
(an insertion sequence). Pages continue from a cursor, so rows added meanwhile neither repeat nor
vanish from later pages.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from services.core.database import Location, Migration
from services.core.database_open import open_database
from services.core.errors import NotFound
from services.core.structured import ToolCall
from services.session.history import Turn
from services.session.records import (
    EDITABLE, ROLE_ASSISTANT, ROLE_TOOL, ROLE_USER, STATUS_COMPLETE, STATUS_INCOMPLETE, MessageRecord, SessionCursor,
    SessionDraft, SessionRecord, SessionStore, StoredResponse, TurnMessages,
)

MIGRATIONS: tuple[Migration, ...] = (
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        system_prompt TEXT NOT NULL,
        sampling TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX sessions_owner_recent ON sessions(owner, updated_at DESC, id DESC);
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_session ON messages(session_id, seq);
    """,
    # Tool turns: an assistant message's calls as a JSON list of {id, name, arguments}; a tool
    # message's answered call id.
    """
    ALTER TABLE messages ADD COLUMN tool_calls TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE messages ADD COLUMN tool_call_id TEXT NOT NULL DEFAULT '';
    """,
    # The running turn of a session, held by one replica until it ends or its lease expires.
    """
    CREATE TABLE turn_leases (
        session_id TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # Responses API: what a response's request said beyond its messages, by the assistant message
    # that answers it. input_count: how many messages just before it were that request's input.
    """
    CREATE TABLE responses (
        message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        request TEXT NOT NULL,
        input_count INTEGER NOT NULL,
        finish_reason TEXT NOT NULL DEFAULT ''
    );
    """,
    # Reasoning models: an assistant message's reasoning, kept apart from its content (shown, never
    # sent back to the model), and how many of its completion tokens it took.
    """
    ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
    """,
)



def _session(row: Any) -> SessionRecord:
    return SessionRecord(row["id"], row["owner"], row["title"], row["model"], row["system_prompt"],
                         json.loads(row["sampling"]), row["created_at"], row["updated_at"])


def _message(row: Any) -> MessageRecord:
    return MessageRecord(row["id"], row["session_id"], row["role"], row["content"], row["model"], row["status"],
                         row["created_at"], row["prompt_tokens"], row["completion_tokens"], row["error"],
                         tool_calls=tuple(ToolCall(**c) for c in json.loads(row["tool_calls"])),
                         tool_call_id=row["tool_call_id"], reasoning=row["reasoning"],
                         reasoning_tokens=row["reasoning_tokens"], seq=row["seq"])


def _calls_json(calls: Sequence[ToolCall]) -> str:
    return json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls])


def response_not_found(message_id: str) -> NotFound:
    return NotFound(f"response 'resp_{message_id}' not found")


def not_found(session_id: str) -> NotFound:
    # The same words whether the session never existed or belongs to someone else.
    return NotFound(f"session {session_id!r} not found")


# SQLite files' turn leases, by file: session id -> (holder, expiry).
_LOCAL_LEASES: dict[str, dict[str, tuple[str, float]]] = {}
_LOCAL_LOCK = threading.Lock()


class SqlSessionStore(SessionStore):
    def __init__(self, where: Location) -> None:
        """`where`: an SQLite file's path, or DatabaseSettings naming a PostgreSQL database."""
        self.db = open_database(where, MIGRATIONS, "session")
        self._leases: dict[str, tuple[str, float]] | None = None  # in memory (SQLite), else rows
        if self.db.dialect == "sqlite":
            # One process owns an SQLite file: rows left by an earlier version belong to nobody.
            with self.db.transaction() as db:
                db.execute("DELETE FROM turn_leases")
            with _LOCAL_LOCK:
                self._leases = _LOCAL_LEASES.setdefault(os.path.realpath(str(where)), {})

    def close(self) -> None:
        self.db.close()

    def create_session(self, owner: str, *, title: str, model: str, system_prompt: str,
                       sampling: Mapping[str, Any]) -> SessionRecord:
        now = time.time()
        record = SessionRecord(uuid.uuid4().hex, owner, title, model, system_prompt, dict(sampling), now, now)
        with self.db.transaction() as db:
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.id, owner, title, model, system_prompt, json.dumps(record.sampling), now, now))
        return record

    def get_session(self, owner: str, session_id: str) -> SessionRecord:
        rows = self.db.read("SELECT * FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
        if not rows:
            raise not_found(session_id)
        return _session(rows[0])

    def list_sessions(self, owner: str, limit: int, after: SessionCursor | None) -> list[SessionRecord]:
        if after is None:
            rows = self.db.read("SELECT * FROM sessions WHERE owner = ? ORDER BY updated_at DESC, id DESC LIMIT ?",
                                (owner, limit))
        else:
            rows = self.db.read(
                "SELECT * FROM sessions WHERE owner = ? AND (updated_at < ? OR (updated_at = ? AND id < ?)) "
                "ORDER BY updated_at DESC, id DESC LIMIT ?",
                (owner, after.updated_at, after.updated_at, after.id, limit))
        return [_session(r) for r in rows]

    def update_session(self, owner: str, session_id: str, changes: Mapping[str, Any]) -> SessionRecord:
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise ValueError(f"not editable: {sorted(unknown)}")
        values = {k: json.dumps(v) if k == "sampling" else v for k, v in changes.items()}
        with self.db.transaction() as db:
            assignments = "".join(f"{name} = ?, " for name in values)
            cursor = db.execute(f"UPDATE sessions SET {assignments}updated_at = ? WHERE id = ? AND owner = ?",
                                (*values.values(), time.time(), session_id, owner))
            if cursor.rowcount == 0:
                raise not_found(session_id)
        return self.get_session(owner, session_id)

    def delete_session(self, owner: str, session_id: str) -> None:
        with self.db.transaction() as db:
            if db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)).rowcount == 0:
                raise not_found(session_id)
            db.execute("DELETE FROM turn_leases WHERE session_id = ?", (session_id,))
        if self._leases is not None:
            with _LOCAL_LOCK:
                self._leases.pop(session_id, None)

    def start_turn(self, owner: str, session_id: str, content: str, model: str, title: str, *,
                   tool_results: Sequence[tuple[str, str]] = ()) -> TurnMessages:
        now = time.time()
        tools = tuple(MessageRecord(uuid.uuid4().hex, session_id, ROLE_TOOL, text, model, STATUS_COMPLETE, now,
                                    tool_call_id=call_id) for call_id, text in tool_results)
        user = None
        if content:
            user = MessageRecord(uuid.uuid4().hex, session_id, ROLE_USER, content, model, STATUS_COMPLETE, now)
        # The assistant's row exists from the start, so even a crash mid-answer leaves it (incomplete).
        assistant = MessageRecord(uuid.uuid4().hex, session_id, ROLE_ASSISTANT, "", model, STATUS_INCOMPLETE, now)
        with self.db.transaction() as db:
            cursor = db.execute(
                "UPDATE sessions SET updated_at = ?, title = CASE WHEN title = '' THEN ? ELSE title END "
                "WHERE id = ? AND owner = ?", (now, title, session_id, owner))
            if cursor.rowcount == 0:
                raise not_found(session_id)
            for m in (*tools, *([user] if user else []), assistant):
                db.execute("INSERT INTO messages (id, session_id, role, content, model, status, created_at, tool_call_id) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (m.id, session_id, m.role, m.content, m.model, m.status, now, m.tool_call_id))
        return TurnMessages(user, assistant, tools)

    def save_answer(self, message_id: str, *, content: str, status: str, prompt_tokens: int = 0,
                    completion_tokens: int = 0, error: str = "", tool_calls: Sequence[ToolCall] = (),
                    reasoning: str = "", reasoning_tokens: int = 0) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE messages SET content = ?, status = ?, prompt_tokens = ?, completion_tokens = ?, error = ?, "
                       "tool_calls = ?, reasoning = ?, reasoning_tokens = ? WHERE id = ?",
                       (content, status, prompt_tokens, completion_tokens, error, _calls_json(tool_calls), reasoning,
                        reasoning_tokens, message_id))

    def list_messages(self, owner: str, session_id: str, limit: int | None = None, after_seq: int = 0) -> list[MessageRecord]:
        self.get_session(owner, session_id)  # the ownership check
        sql = "SELECT * FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq"
        if limit is None:
            rows = self.db.read(sql, (session_id, after_seq))
        else:
            rows = self.db.read(sql + " LIMIT ?", (session_id, after_seq, limit))
        return [_message(r) for r in rows]

    def start_response(self, owner: str, session_id: str, inputs: Sequence[Turn], model: str,
                       request: Mapping[str, Any], *, draft: SessionDraft | None = None) -> TurnMessages:
        now = time.time()
        with self.db.transaction() as db:
            if draft is not None:
                session_id = draft.id or uuid.uuid4().hex
                db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (session_id, owner, draft.title, draft.model, draft.system_prompt,
                            json.dumps(dict(draft.sampling)), now, now))
                if draft.source:
                    if not db.execute("SELECT 1 FROM sessions WHERE id = ? AND owner = ?",
                                      (draft.source, owner)).fetchall():
                        raise not_found(draft.source)
                    history = [_message(r) for r in db.execute(
                        "SELECT * FROM messages WHERE session_id = ? AND seq <= ? ORDER BY seq",
                        (draft.source, draft.through_seq)).fetchall()]
                    for m in history:  # copies under new ids: an id names one message of one session
                        self._insert(db, session_id, replace(m, id=uuid.uuid4().hex), m.created_at)
            elif db.execute("UPDATE sessions SET updated_at = ? WHERE id = ? AND owner = ?",
                            (now, session_id, owner)).rowcount == 0:
                raise not_found(session_id)
            stored = [MessageRecord(uuid.uuid4().hex, session_id, t.role, t.content, model, STATUS_COMPLETE, now,
                                    tool_calls=tuple(t.tool_calls), tool_call_id=t.tool_call_id) for t in inputs]
            answer = MessageRecord(uuid.uuid4().hex, session_id, ROLE_ASSISTANT, "", model, STATUS_INCOMPLETE, now)
            for m in (*stored, answer):
                self._insert(db, session_id, m, now)
            db.execute("INSERT INTO responses (message_id, request, input_count) VALUES (?, ?, ?)",
                       (answer.id, json.dumps(dict(request)), len(stored)))
        return TurnMessages(next((m for m in stored if m.role == ROLE_USER), None), answer,
                            tuple(m for m in stored if m.role == ROLE_TOOL))

    @staticmethod
    def _insert(db: Any, session_id: str, m: MessageRecord, now: float) -> None:
        db.execute("INSERT INTO messages (id, session_id, role, content, model, prompt_tokens, completion_tokens, "
                   "status, error, created_at, tool_calls, tool_call_id, reasoning, reasoning_tokens) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (m.id, session_id, m.role, m.content, m.model, m.prompt_tokens, m.completion_tokens, m.status,
                    m.error, now, _calls_json(m.tool_calls), m.tool_call_id, m.reasoning, m.reasoning_tokens))

    def finish_response(self, message_id: str, finish_reason: str) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE responses SET finish_reason = ? WHERE message_id = ?", (finish_reason, message_id))

    def get_response(self, owner: str, message_id: str) -> StoredResponse:
        rows = self.db.read(
            "SELECT m.*, r.request AS response_request, r.input_count AS response_inputs, "
            "r.finish_reason AS response_finish FROM messages m JOIN sessions s ON s.id = m.session_id "
            "LEFT JOIN responses r ON r.message_id = m.id WHERE m.id = ? AND s.owner = ? AND m.role = ?",
            (message_id, owner, ROLE_ASSISTANT))
        if not rows:
            raise response_not_found(message_id)
        row = rows[0]
        request = row["response_request"]
        return StoredResponse(self.get_session(owner, row["session_id"]), _message(row),
                              None if request is None else json.loads(request), row["response_inputs"] or 0,
                              row["response_finish"] or "")

    def response_inputs(self, owner: str, message_id: str) -> list[MessageRecord]:
        found = self.get_response(owner, message_id)
        earlier = [_message(r) for r in self.db.read(
            "SELECT * FROM messages WHERE session_id = ? AND seq < ? ORDER BY seq",
            (found.session.id, found.message.seq))]
        if found.request is not None:
            return earlier[len(earlier) - found.input_count:] if found.input_count else []
        start = len(earlier)  # a chat turn: what came after the previous answer
        while start > 0 and earlier[start - 1].role != ROLE_ASSISTANT:
            start -= 1
        return earlier[start:]

    def delete_response(self, owner: str, message_id: str) -> None:
        found = self.get_response(owner, message_id)
        doomed = [m.id for m in self.response_inputs(owner, message_id)] + [message_id]
        with self.db.transaction() as db:
            for id_ in doomed:
                db.execute("DELETE FROM messages WHERE id = ?", (id_,))
            if not db.execute("SELECT 1 FROM messages WHERE session_id = ? LIMIT 1", (found.session.id,)).fetchall():
                db.execute("DELETE FROM sessions WHERE id = ?", (found.session.id,))
            else:
                db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (time.time(), found.session.id))

    def acquire_turn(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        now = time.time()
        if self._leases is not None:
            with _LOCAL_LOCK:
                current = self._leases.get(session_id)
                if current is not None and current[1] > now:
                    return False
                self._leases[session_id] = (holder, now + ttl_seconds)
                return True
        with self.db.transaction() as db:
            # Inserts, or takes over an expired lease; a live one is left as it is (no row changes).
            cursor = db.execute(
                "INSERT INTO turn_leases VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE "
                "SET holder = excluded.holder, expires_at = excluded.expires_at WHERE turn_leases.expires_at <= ?",
                (session_id, holder, now + ttl_seconds, now))
            return cursor.rowcount == 1

    def renew_turn(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        if self._leases is not None:
            with _LOCAL_LOCK:
                if self._leases.get(session_id, ("", 0.0))[0] != holder:
                    return False
                self._leases[session_id] = (holder, time.time() + ttl_seconds)
                return True
        with self.db.transaction() as db:
            cursor = db.execute("UPDATE turn_leases SET expires_at = ? WHERE session_id = ? AND holder = ?",
                                (time.time() + ttl_seconds, session_id, holder))
            return cursor.rowcount == 1

    def release_turn(self, session_id: str, holder: str) -> None:
        if self._leases is not None:
            with _LOCAL_LOCK:
                if self._leases.get(session_id, ("", 0.0))[0] == holder:
                    del self._leases[session_id]
            return
        with self.db.transaction() as db:
            db.execute("DELETE FROM turn_leases WHERE session_id = ? AND holder = ?", (session_id, holder))

    def schema_version(self) -> int:
        return self.db.schema_version()


SqliteSessionStore = SqlSessionStore  # its name before it served PostgreSQL too
