"""What session's store holds and the interface every store implements: sessions, their messages
(user, assistant, tool; an assistant message's tool calls and reasoning apart), Responses API
responses, and page cursors. The SQL implementation is services.session.store."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.structured import ToolCall
from services.session.history import Turn

ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"
ROLE_TOOL = "tool"
STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"
STATUS_ERROR = "error"

# Fields of a session that update_session may change.
EDITABLE = ("title", "model", "system_prompt", "sampling")


@dataclass(frozen=True)
class SessionRecord:
    id: str
    owner: str
    title: str
    model: str
    system_prompt: str
    # Sampling defaults as a JSON object of SamplingParams fields (only those that were set).
    sampling: Mapping[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class MessageRecord:
    id: str
    session_id: str
    role: str
    content: str
    model: str
    status: str
    created_at: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    reasoning: str = ""  # an assistant message's thinking, apart from its content
    reasoning_tokens: int = 0
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class TurnMessages:
    """What start_turn stored. Unpacks as `user, answer` for callers that need only those."""

    user: MessageRecord | None  # None when the turn had tool results only
    answer: MessageRecord
    tools: tuple[MessageRecord, ...] = ()

    def __iter__(self) -> Iterator[MessageRecord | None]:
        return iter((self.user, self.answer))


@dataclass(frozen=True)
class SessionDraft:
    """The session a stored response starts: a new one, or (with `source`) a fork that copies the
    messages of the caller's session `source` up to and including the one at `through_seq`."""

    title: str
    model: str
    system_prompt: str = ""
    sampling: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    through_seq: int = 0
    id: str = ""  # chosen by the caller (it routes the answer before the session exists), or new


@dataclass(frozen=True)
class StoredResponse:
    """An assistant message seen as a Responses API response. `request` is None for an answer of a
    chat turn (then its input is the turn's tool results and user message)."""

    session: SessionRecord
    message: MessageRecord
    request: Mapping[str, Any] | None
    input_count: int
    finish_reason: str


@dataclass(frozen=True)
class SessionCursor:
    """Where a page of sessions ends."""

    updated_at: float
    id: str


class SessionStore(abc.ABC):
    @abc.abstractmethod
    def create_session(self, owner: str, *, title: str, model: str, system_prompt: str,
                       sampling: Mapping[str, Any]) -> SessionRecord: ...

    @abc.abstractmethod
    def get_session(self, owner: str, session_id: str) -> SessionRecord: ...

    @abc.abstractmethod
    def list_sessions(self, owner: str, limit: int, after: SessionCursor | None) -> list[SessionRecord]: ...

    @abc.abstractmethod
    def update_session(self, owner: str, session_id: str, changes: Mapping[str, Any]) -> SessionRecord: ...

    @abc.abstractmethod
    def delete_session(self, owner: str, session_id: str) -> None: ...

    @abc.abstractmethod
    def start_turn(self, owner: str, session_id: str, content: str, model: str, title: str, *,
                   tool_results: Sequence[tuple[str, str]] = ()) -> TurnMessages:
        """Stores in one transaction a tool message per (tool_call_id, content) of `tool_results`, the
        user's message (unless `content` is empty) and an empty, incomplete assistant message, and
        `title` if the session has none yet."""

    @abc.abstractmethod
    def save_answer(self, message_id: str, *, content: str, status: str, prompt_tokens: int = 0,
                    completion_tokens: int = 0, error: str = "", tool_calls: Sequence[ToolCall] = (),
                    reasoning: str = "", reasoning_tokens: int = 0) -> None:
        """Overwrites an assistant message with its (partial or final) text, reasoning, tool calls and
        status."""

    @abc.abstractmethod
    def list_messages(self, owner: str, session_id: str, limit: int | None = None, after_seq: int = 0) -> list[MessageRecord]: ...

    # The Responses API: a response is an assistant message, with its request kept beside it.

    @abc.abstractmethod
    def start_response(self, owner: str, session_id: str, inputs: Sequence[Turn], model: str,
                       request: Mapping[str, Any], *, draft: SessionDraft | None = None) -> TurnMessages:
        """Stores in one transaction: the session `draft` describes (instead of using `session_id`),
        the `inputs` as messages, an empty incomplete assistant message, and `request` beside it."""

    @abc.abstractmethod
    def finish_response(self, message_id: str, finish_reason: str) -> None: ...

    @abc.abstractmethod
    def get_response(self, owner: str, message_id: str) -> StoredResponse:
        """NOT_FOUND unless `message_id` is an assistant message in one of the owner's sessions."""

    @abc.abstractmethod
    def response_inputs(self, owner: str, message_id: str) -> list[MessageRecord]:
        """The messages a response answered: its request's input, or a chat turn's tool results and
        user message. Oldest first."""

    @abc.abstractmethod
    def delete_response(self, owner: str, message_id: str) -> None:
        """Deletes a response's input messages and its answer; a session left empty goes too."""

    @abc.abstractmethod
    def acquire_turn(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        """Takes the session's turn lease for `holder` until now + ttl; False while another holder's
        lease has not expired. Exactly one of concurrent callers (any replica) gets True."""

    @abc.abstractmethod
    def renew_turn(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        """Extends `holder`'s lease; False if it no longer holds it (it expired and was taken)."""

    @abc.abstractmethod
    def release_turn(self, session_id: str, holder: str) -> None:
        """Ends `holder`'s lease (another holder's is left alone)."""

    @abc.abstractmethod
    def close(self) -> None: ...
