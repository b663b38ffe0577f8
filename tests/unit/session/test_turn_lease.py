"""One running turn per session across replicas: two SessionService replicas on one database (two
stores, so two connections or pools, as two processes would have), on both backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from parley.inference.v1 import inference_pb2 as pb
from parley.session.v1 import session_pb2

from services.core.database import Location
from services.core.errors import Aborted
from services.core.identity import Identity
from services.session.service import SessionService
from services.session.settings import SessionSettings
from services.session.store import SqlSessionStore
from tests.unit.session.test_tool_turns import USAGE, Inference


@pytest.fixture
def stores(database: Location) -> Iterator[tuple[SqlSessionStore, SqlSessionStore]]:
    a, b = SqlSessionStore(database), SqlSessionStore(database)
    yield a, b
    a.close()
    b.close()


def replica(store: SqlSessionStore, inference: Inference, lease_seconds: float = 30.0) -> SessionService:
    return SessionService(store, SessionSettings(turn_lease_seconds=lease_seconds), inference)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def alice(monkeypatch: pytest.MonkeyPatch) -> None:
    who = Identity("alice", "alice", frozenset({"user"}))
    monkeypatch.setattr("services.session.service.current_identity", lambda: who)


def story() -> list[pb.GenerateResponse]:
    return [pb.GenerateResponse(text="Once"), pb.GenerateResponse(text=" upon", finish_reason=pb.FINISH_REASON_STOP,
                                                                   usage=USAGE)]


async def finish(stream: Any) -> list[session_pb2.ChatResponse]:
    return [event async for event in stream]


async def test_a_turn_on_one_replica_makes_the_other_answer_409_until_it_ends(
        stores: tuple[SqlSessionStore, SqlSessionStore]) -> None:
    inference = Inference()
    inference.scripts += [story(), story()]
    a, b = replica(stores[0], inference), replica(stores[1], inference)
    sid = stores[0].create_session("alice", title="", model="", system_prompt="", sampling={}).id
    running = a.chat(session_pb2.ChatRequest(session_id=sid, content="Tell me a story."))
    assert (await anext(running)).HasField("start")  # replica a holds the turn
    with pytest.raises(Aborted, match="already being generated"):
        await anext(b.chat(session_pb2.ChatRequest(session_id=sid, content="Me too.")))
    assert (await finish(running))[-1].HasField("done")
    # Ended: the other replica's turn runs, and a's answer was saved before the lease went back.
    assert (await finish(b.chat(session_pb2.ChatRequest(session_id=sid, content="Another."))))[-1].HasField("done")
    assert [m.content for m in stores[1].list_messages("alice", sid)] == [
        "Tell me a story.", "Once upon", "Another.", "Once upon"]


async def test_a_dead_replicas_lease_expires_and_a_long_turn_keeps_its_own(
        stores: tuple[SqlSessionStore, SqlSessionStore]) -> None:
    sid = stores[0].create_session("alice", title="", model="", system_prompt="", sampling={}).id
    # A replica took the turn and died: nobody renews or releases its lease.
    assert stores[0].acquire_turn(sid, "dead-replica", 1.0)
    inference = Inference()
    inference.scripts.append(story())
    b = replica(stores[1], inference, lease_seconds=1.0)
    with pytest.raises(Aborted):
        await anext(b.chat(session_pb2.ChatRequest(session_id=sid, content="Hello?")))
    await asyncio.sleep(1.1)
    long_turn = b.chat(session_pb2.ChatRequest(session_id=sid, content="Hello again."))
    assert (await anext(long_turn)).HasField("start")
    started = time.monotonic()
    await asyncio.sleep(1.6)  # past the lease's lifetime: renewals keep it
    assert time.monotonic() - started > 1.0
    assert not stores[0].acquire_turn(sid, "another-replica", 30)
    await finish(long_turn)
    assert stores[0].acquire_turn(sid, "another-replica", 30)
