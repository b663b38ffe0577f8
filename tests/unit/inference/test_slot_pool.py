"""Slot choice and admission for slot engines (torch), with plain Slot objects (no engine)."""

from __future__ import annotations

import asyncio

import pytest

from services.core.errors import ResourceExhausted
from services.inference.engines.fair import Owner
from services.inference.engines.slots import Slot, SlotPool


async def test_prefers_the_slot_holding_the_longest_prefix() -> None:
    slots = [Slot(0, tokens=[1, 2, 3]), Slot(1, tokens=[1, 2, 3, 4, 5, 6]), Slot(2, tokens=[9])]
    pool = SlotPool(slots, queue_depth=1)
    assert (await pool.acquire([1, 2, 3, 4, 5, 6, 7, 8])).index == 1
    # That slot is busy now: the next best is taken.
    assert (await pool.acquire([1, 2, 3, 4, 5, 6, 7, 8])).index == 0


async def test_ties_go_to_the_least_recently_used_slot() -> None:
    slots = [Slot(0, last_used=5.0), Slot(1, last_used=1.0), Slot(2, last_used=3.0)]
    pool = SlotPool(slots, queue_depth=0)
    assert (await pool.acquire([7])).index == 1


async def test_waits_in_a_bounded_queue_then_refuses() -> None:
    pool = SlotPool([Slot(0)], queue_depth=1)
    first = await pool.acquire([1])
    waiter = asyncio.ensure_future(pool.acquire([1]))
    await asyncio.sleep(0)
    assert pool.waiting == 1
    with pytest.raises(ResourceExhausted) as info:
        await pool.acquire([1])
    assert info.value.retry_after and "queue depth 1" in info.value.message
    pool.release(first)
    assert (await waiter) is first
    assert pool.waiting == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    pool = SlotPool([Slot(0)], queue_depth=1)
    await pool.acquire([1])
    waiter = asyncio.ensure_future(pool.acquire([1]))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.waiting == 0


async def test_a_slot_stays_busy_until_its_worker_thread_stops() -> None:
    pool = SlotPool([Slot(0)], queue_depth=1)
    slot = await pool.acquire([1])
    slot.worker = asyncio.get_running_loop().create_future()
    pool.release(slot)  # the caller is gone, but the worker is still decoding
    await asyncio.sleep(0.01)
    assert slot.busy and pool.running == 1
    slot.worker.set_result(None)
    await asyncio.sleep(0.01)
    assert not slot.busy and (await pool.acquire([1])) is slot


async def test_waiters_are_told_their_place_as_the_line_moves() -> None:
    pool = SlotPool([Slot(0), Slot(1)], queue_depth=4)
    held = [await pool.acquire([1]), await pool.acquire([1])]
    first, second = object(), object()
    waiters = [pool.enqueue([1], key=first), pool.enqueue([1], key=second)]
    assert pool.place(first)[0] == 1 and pool.place(second)[0] == 2
    moved = pool.line_watch.listen()
    pool.release(held[0])
    await asyncio.sleep(0)  # the event is set on the loop (LineWatch calls it soon, thread-safe)
    assert moved.is_set()  # pushed, not polled
    assert await pool.wait(waiters[0]) is held[0]
    assert pool.place(first) is None  # it runs
    assert pool.place(second)[0] == 1
    moved = pool.line_watch.listen()
    pool.release(held[1])
    await asyncio.sleep(0)
    assert moved.is_set() and pool.place(second) is None
    assert pool.place(object()) is None  # a request the pool does not know


async def test_a_cancelled_waiter_leaves_the_line_and_the_others_move_up() -> None:
    pool = SlotPool([Slot(0)], queue_depth=4)
    await pool.acquire([1])
    first, second = object(), object()
    waiting = asyncio.ensure_future(pool.acquire([1], key=first))
    await asyncio.sleep(0)
    pool.enqueue([1], key=second)
    assert pool.place(second)[0] == 2
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.place(second)[0] == 1


async def test_a_freed_slot_goes_to_the_waiter_first_in_line_while_it_ran() -> None:
    # One slot: when Alice's request ends, Bob's waiter (first in line while hers ran, as its place
    # said) takes the slot, not Alice's older one; then hers, then Alice's last.
    alice, bob = Owner("alice"), Owner("bob")
    pool = SlotPool([Slot(0)], queue_depth=4)
    slot = await pool.acquire([1], alice)
    second, third = pool.enqueue([1], alice, key="a2"), pool.enqueue([1], alice, key="a3")
    other = pool.enqueue([1], bob, key="b1")
    assert (pool.place("b1")[0], pool.place("a2")[0], pool.place("a3")[0]) == (1, 2, 3)
    pool.release(slot)
    assert other.slot.done() and not second.slot.done()
    pool.release(await pool.wait(other))
    assert second.slot.done() and not third.slot.done()


async def test_a_withdrawn_or_refused_waiter_gives_back_what_it_holds_once() -> None:
    pool = SlotPool([Slot(0)], queue_depth=4)
    held = pool.enqueue([1])
    waiting, late = pool.enqueue([1]), pool.enqueue([1])
    pool.refuse(late, TimeoutError("deadline"))  # out of line with the error its wait raises
    with pytest.raises(TimeoutError):
        await pool.wait(late)
    pool.withdraw(waiting)  # left the line before its turn
    assert pool.waiting == 0
    pool.withdraw(held)
    pool.withdraw(held)  # a second call does not free the slot someone else took meanwhile
    taken = await pool.acquire([1])
    pool.withdraw(held)
    assert taken.busy and pool.running == 1
