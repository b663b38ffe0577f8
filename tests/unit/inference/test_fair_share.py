"""Fair share (engines.fair): the policy's order, queue bound, victims and prefill split; the batch
scheduler over a fake llama.cpp (tests.unit.inference.fake_llama) pausing a heavy user's choice for
a newcomer and resuming it with its KV intact; torch slots and embedding batches taking users in turn."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from services.core import identity
from services.core.errors import ResourceExhausted
from services.core.identity import Identity
from services.inference.engines.fair import Owner, Policy, Shares, current_owner
from services.inference.engines.sequence import Request, Sampling
from services.inference.engines.slots import Slot, SlotPool
from tests.unit.inference.fake_llama import scheduler
from tests.unit.inference.test_embeddings import SlowEngine

A, B, C = Owner("alice"), Owner("bob"), Owner("carol")


@dataclass(eq=False)
class Item:
    owner: Owner
    name: str
    cost: int = 1


def names(items: list[Item]) -> list[str]:
    return [i.name for i in items]


# --- the policy ------------------------------------------------------------------------------
def test_the_line_serves_the_least_loaded_user_first_and_each_user_in_arrival_order() -> None:
    waiting = [Item(A, "a1"), Item(A, "a2"), Item(A, "a3"), Item(B, "b1"), Item(C, "c1"), Item(B, "b2")]
    fair = Policy(True, 4, 8)
    assert names(fair.line(waiting, Shares([(A, 2)]))) == ["b1", "c1", "b2", "a1", "a2", "a3"]
    # Equal loads: whoever came first.
    assert names(fair.line(waiting, Shares())) == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert names(Policy(False, 4, 8).line(waiting, Shares([(A, 2)]))) == names(waiting)
    assert fair.ahead(waiting[3], waiting, Shares([(A, 2)])) == 0
    assert fair.ahead(waiting[0], waiting, Shares([(A, 2)])) == 3


def test_one_users_api_keys_take_turns_and_weights_scale_shares() -> None:
    key1, key2 = Owner("alice", "k1"), Owner("alice", "k2")
    waiting = [Item(key1, "x1"), Item(key1, "x2"), Item(key2, "y1")]
    assert names(Policy(True, 4, 8).line(waiting, Shares([(key1, 1)]))) == ["y1", "x1", "x2"]
    heavy = Owner("bob", weight=2.0)
    waiting = [Item(A, "a1"), Item(A, "a2"), Item(heavy, "b1"), Item(heavy, "b2"), Item(heavy, "b3")]
    # Bob's weight of 2 takes two turns for each of Alice's.
    assert names(Policy(True, 4, 8).line(waiting, Shares())) == ["a1", "b1", "b2", "a2", "b3"]


def test_a_heavier_api_key_gets_more_of_its_users_share_and_other_users_keep_theirs() -> None:
    batch, chat, bob = Owner("alice", "batch"), Owner("alice", "chat", key_weight=3.0), Owner("bob")
    waiting = ([Item(batch, f"batch{i}") for i in range(8)] + [Item(chat, f"chat{i}") for i in range(8)]
               + [Item(bob, f"bob{i}") for i in range(8)])
    for running in (Shares(), Shares([(batch, 1), (bob, 1)])):
        first = names(Policy(True, 4, 8).line(waiting, running, limit=16))
        # Bob keeps his half; Alice's half goes three to one to her chat key, each key in arrival order.
        assert sum(n.startswith("bob") for n in first) == 8
        assert [n for n in first if n.startswith("chat")] == [f"chat{i}" for i in range(6)]
        assert [n for n in first if n.startswith("batch")] == ["batch0", "batch1"]
    # Equal key weights take plain turns, as before.
    even = [Item(batch, f"batch{i}") for i in range(4)] + [Item(Owner("alice", "chat"), f"chat{i}") for i in range(4)]
    assert names(Policy(True, 4, 8).line(even, Shares(), limit=4)) == ["batch0", "chat0", "batch1", "chat1"]


def test_the_owner_of_a_call_carries_its_api_keys_weight() -> None:
    token = identity._current.set(Identity("u1", "alice", frozenset({"user"}), "k1", api_key_weight=3.0))
    try:
        assert current_owner(2.0) == Owner("u1", "k1", 2.0, 3.0)
    finally:
        identity._current.reset(token)
    assert current_owner() == Owner()


def test_a_full_queue_refuses_the_user_who_filled_it_not_the_next_one() -> None:
    fair, fifo = Policy(True, 4, 4), Policy(False, 4, 4)
    full = Shares([(A, 8)])
    assert not fair.fits(A, 1, full) and not fifo.fits(A, 1, full)
    assert fair.fits(B, 1, full) and not fifo.fits(B, 1, full)
    # Two users: each may hold half of the room (4 running + 4 waiting) once it is taken.
    shared = Shares([(A, 6), (B, 3)])
    assert fair.fits(B, 1, shared) and not fair.fits(A, 1, shared)
    assert not fair.fits(B, 1, Shares([(A, 6), (B, 4)]))
    assert fair.fits(Owner("bob", weight=3.0), 2, Shares([(A, 6), (Owner("bob", weight=3.0), 4)]))


def test_victims_are_taken_from_the_most_loaded_user_until_shares_are_even() -> None:
    fair = Policy(True, 4, 4)
    assert fair.victim(B, 1, Shares([(A, 4)])) == "alice"
    assert fair.victim(B, 1, Shares([(A, 3), (B, 1)])) == "alice"
    assert fair.victim(B, 1, Shares([(A, 2), (B, 2)])) is None
    assert fair.victim(C, 1, Shares([(A, 1), (B, 3)])) == "bob"
    assert fair.victim(A, 1, Shares([(A, 4)])) is None  # never one's own
    assert fair.victim(B, 1, Shares([(A, 1)])) is None  # one slot each way would swap owners every step
    assert Policy(False, 4, 4).victim(B, 1, Shares([(A, 4)])) is None


def test_prefill_splits_a_steps_room_between_users_and_passes_on_what_one_leaves() -> None:
    fair, fifo = Policy(True, 4, 4), Policy(False, 4, 4)
    wants = [(A, 500), (A, 100), (B, 20)]
    assert fifo.prefill(wants, 64) == [64, 0, 0]
    assert fair.prefill(wants, 64) == [44, 0, 20]  # Bob's whole prompt now; Alice gets what he leaves
    assert fair.prefill([(A, 500), (B, 500)], 64) == [32, 32]
    assert fair.prefill(wants, 0) == [0, 0, 0]


# --- the batch scheduler over a fake llama.cpp ----------------------------------------------------
def request(owner: Owner, prompt: list[int], max_tokens: int) -> Request:
    return Request("fake", prompt, Sampling(max_tokens=max_tokens), started=time.monotonic(), deadline=None,
                   budget=max_tokens, detokenize=lambda t: f"{t} ".encode(), is_end=lambda t: False, owner=owner)


async def answer(req: Request) -> list[str]:
    return "".join([chunk.text async for chunk in req.chunks()]).split()


async def run(batch, until) -> int:
    steps = 0
    while not until():
        batch._step()
        steps += 1
        await asyncio.sleep(0)  # the courier's chunks reach the requests
        assert steps < 500
    return steps


async def test_a_newcomer_pauses_a_heavy_users_choice_which_resumes_with_its_kv_intact() -> None:
    alone, _ = scheduler()
    reference = request(A, list(range(10, 50)), 24)
    alone.submit(reference)
    await run(alone, lambda: reference.done)

    batch, llama = scheduler(slots=2, spare=0)
    first, second = request(A, list(range(10, 50)), 24), request(A, list(range(60, 90)), 24)
    batch.submit(first)
    batch.submit(second)
    await run(batch, lambda: all(c.completion_tokens >= 3 for c in first.choices + second.choices))
    newcomer = request(B, list(range(100, 110)), 4)
    batch.submit(newcomer)
    assert batch.queue_place(newcomer) is None  # it starts at the next step
    await run(batch, lambda: newcomer.admitted)
    assert batch.stats["paused"] == 1 and batch.waiting == 1
    assert {d.request for d in batch._active} == {first, newcomer}  # the later of Alice's gave way
    assert await run(batch, lambda: newcomer.usage.completion_tokens) <= 2  # its first token a step later
    await run(batch, lambda: first.done and second.done and newcomer.done)
    assert batch.stats["resumed"] == 1 and batch.stats["recomputed"] == 0
    # Nothing lost, nothing evaluated twice: the paused answer is the one it gives uninterrupted.
    assert await answer(first) == await answer(reference)
    paused = await answer(second)
    assert len(paused) == 24 and len(await answer(newcomer)) == 4
    assert llama.decoded == sum(len(r.prompt) + 24 - 1 for r in (first, second)) + len(newcomer.prompt) + 4 - 1
    paused_alone, _ = scheduler()
    again = request(A, list(range(60, 90)), 24)
    paused_alone.submit(again)
    await run(paused_alone, lambda: again.done)
    assert paused == await answer(again)


async def test_a_newcomer_starts_on_a_spare_choice_and_the_next_one_pauses_a_heavy_users() -> None:
    """A user that runs nothing starts beyond parallel_slots (nobody pauses: the flood's streams keep
    decoding in a full batch); with the spare taken, the next newcomer pauses a choice; the total
    falls back under parallel_slots as answers end."""
    batch, _ = scheduler(slots=2, spare=1)
    heavy = [request(A, list(range(10 * i, 10 * i + 20)), 12) for i in range(1, 4)]
    for r in heavy:
        batch.submit(r)
    await run(batch, lambda: heavy[0].usage.completion_tokens >= 2)
    bob = request(B, [7] * 10, 20)
    batch.submit(bob)
    assert batch.queue_place(bob) is None
    await run(batch, lambda: bob.admitted)
    assert batch._choices() == 3 and batch.stats["paused"] == 0
    carol = request(C, [8] * 10, 20)
    batch.submit(carol)
    await run(batch, lambda: carol.admitted)
    assert batch.stats["paused"] == 1 and batch._choices() == 3
    most = 0
    while not all(r.done for r in [*heavy, bob, carol]):
        batch._step()
        await asyncio.sleep(0)
        most = max(most, batch._choices())
        if bob.done and carol.done:
            assert batch._choices() <= 2
    assert most <= 3 and [len(await answer(r)) for r in heavy] == [12, 12, 12]
    assert batch.stats["resumed"] == 1 and batch.stats["recomputed"] == 0


async def test_first_come_first_served_makes_the_newcomer_wait_for_a_whole_answer() -> None:
    batch, _ = scheduler(slots=2, fair=False)
    first, second = request(A, list(range(10, 50)), 24), request(A, list(range(60, 90)), 24)
    batch.submit(first)
    batch.submit(second)
    await run(batch, lambda: first.usage.completion_tokens >= 3)
    newcomer = request(B, list(range(100, 110)), 4)
    batch.submit(newcomer)
    assert batch.queue_place(newcomer)[0] == 1
    await run(batch, lambda: newcomer.admitted)
    assert first.done or second.done
    assert batch.stats["paused"] == 0


async def test_queue_places_tell_the_order_requests_start_in() -> None:
    batch, _ = scheduler(slots=2, queue_depth=8, spare=0)
    a_running, b_running = request(A, [1] * 12, 6), request(B, [2] * 12, 40)
    batch.submit(a_running)
    batch.submit(b_running)
    await run(batch, lambda: a_running.admitted and b_running.admitted)
    waiting = [request(A, [3] * 12, 4), request(A, [4] * 12, 4), request(B, [5] * 12, 4), request(C, [6] * 12, 4)]
    for r in waiting:
        batch.submit(r)
    places = {r: batch.queue_place(r)[0] for r in waiting}
    # Carol runs nothing: she goes first (without pausing anyone: one running each is even), then
    # Alice and Bob in turn, Alice's two in the order she sent them.
    order = sorted(waiting, key=places.__getitem__)
    assert order == [waiting[3], waiting[0], waiting[2], waiting[1]] and sorted(places.values()) == [1, 2, 3, 4]
    # A place is re-read each time the line moves (a running answer ends: its user's load drops);
    # at every step, the requests that start are the first in line as last told.
    while not all(r.done for r in waiting):
        line = sorted((r for r in waiting if not r.admitted), key=lambda r: (batch.queue_place(r) or (0, 0))[0])
        batch._step()
        await asyncio.sleep(0)
        started = [r for r in line if r.admitted]
        assert line[:len(started)] == started
    assert batch.stats["paused"] == 0


async def test_the_queue_bound_refuses_the_flooding_user_and_admits_the_other() -> None:
    for fair in (True, False):
        batch, _ = scheduler(slots=2, queue_depth=2, fair=fair)
        for _ in range(4):
            batch.submit(request(A, [1] * 12, 8))
        with pytest.raises(ResourceExhausted, match="busy"):
            batch.submit(request(A, [1] * 12, 8))
        if fair:
            batch.submit(request(B, [2] * 12, 8))
        else:
            with pytest.raises(ResourceExhausted):
                batch.submit(request(B, [2] * 12, 8))


async def test_a_request_being_placed_still_counts_against_its_users_share() -> None:
    """Between leaving the line and running, a request is in neither list; a request arriving then
    (the event loop submits while the decode thread places) is counted against it all the same: a
    flood on a loaded machine once got five entries into a room of four."""
    batch, _ = scheduler(slots=2, queue_depth=2, spare=0)
    for _ in range(4):
        batch.submit(request(A, [1] * 12, 8))
    place, outcomes = batch._place, []

    def placing(req: Request) -> None:
        try:
            batch.submit(request(A, [1] * 12, 8))
            outcomes.append("accepted")
        except ResourceExhausted:
            outcomes.append("refused")
        place(req)

    batch._place = placing
    batch._step()
    assert outcomes and set(outcomes) == {"refused"}, outcomes
    assert batch.running + batch.waiting == 4


async def test_a_cancelled_paused_choice_ends_and_frees_its_place() -> None:
    batch, _ = scheduler(slots=2, spare=0)
    other, heavy = request(A, list(range(10, 50)), 30), request(A, list(range(20, 60)), 30)
    batch.submit(other)
    batch.submit(heavy)
    await run(batch, lambda: heavy.usage.completion_tokens >= 2)
    light = request(B, [7] * 10, 20)
    batch.submit(light)
    await run(batch, lambda: light.admitted)
    assert batch.stats["paused"] == 1
    heavy.cancelled = True
    batch._step()
    await asyncio.sleep(0)
    assert batch.waiting == 0 and heavy.choices[0].finish_reason == "cancelled"


# --- engines that cannot pause ------------------------------------------------------------------
async def test_a_freed_torch_slot_goes_to_the_user_who_runs_least() -> None:
    pool = SlotPool([Slot(0), Slot(1)], queue_depth=4)
    held = [await pool.acquire([1], A), await pool.acquire([1], A)]
    alice = [asyncio.ensure_future(pool.acquire([1], A)) for _ in range(2)]
    await asyncio.sleep(0)
    bob = asyncio.ensure_future(pool.acquire([1], B))
    await asyncio.sleep(0)
    assert pool.waiting == 3
    pool.release(held[0])
    await asyncio.sleep(0)
    assert bob.done() and not any(f.done() for f in alice)
    pool.release(held[1])
    await asyncio.sleep(0)
    assert alice[0].done() and not alice[1].done()
    fifo = SlotPool([Slot(0)], queue_depth=4, fair=False)
    first = await fifo.acquire([1], A)
    later = [asyncio.ensure_future(fifo.acquire([1], owner)) for owner in (A, B)]
    await asyncio.sleep(0)
    fifo.release(first)
    await asyncio.sleep(0)
    assert later[0].done() and not later[1].done()


async def test_embedding_batches_take_callers_in_turn() -> None:
    engine = SlowEngine(queue_depth=4)
    engine.seen = []
    forward = engine._forward

    def recording(batch: list[list[int]]) -> object:
        engine.seen.append([seq[1] for seq in batch])
        return forward(batch)

    engine._forward = recording
    await engine.load()
    try:
        deadline = time.monotonic() + 30
        blocker = asyncio.ensure_future(engine.embed([[0, 1, 1]], deadline, A))
        await asyncio.sleep(0.05)  # the worker holds the first pass
        alice = asyncio.ensure_future(engine.embed([[0, 2, 1]] * 200, deadline, A))
        bob = asyncio.ensure_future(engine.embed([[0, 3, 1]], deadline, B))
        await asyncio.sleep(0.05)
        engine.release.set()
        await asyncio.gather(blocker, alice, bob)
        # Bob's one input is in the first batch after Alice's first, not after all 200 of hers.
        assert engine.seen[1][:2] == [2, 3]
    finally:
        await engine.close()
