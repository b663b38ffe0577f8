"""A request's blocking work stops when the request is cancelled (services.inference.flow.offloop): the
thread stops at its next checkpoint, not when the work is done (issue 20: abandoned token counts
held a core for minutes)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.inference.flow import offloop


def work(done: list[float]) -> int:
    """A long job in 2 ms pieces (a message's tokens each), 5 s in all if nothing stops it."""
    for _ in range(2500):
        offloop.checkpoint()
        end = time.monotonic() + 0.002
        while time.monotonic() < end:
            pass
        done.append(time.monotonic())
    return len(done)


async def test_cancelling_the_caller_stops_the_thread_within_100_ms() -> None:
    done: list[float] = []
    task = asyncio.create_task(offloop.run(work, done))
    await asyncio.sleep(0.1)
    assert done, "the work never started"
    cancelled = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    assert done[-1] - cancelled < 0.1
    assert len(done) < 500


async def test_work_that_is_not_cancelled_runs_to_the_end_and_outside_run_checkpoints_do_nothing() -> None:
    def short() -> int:
        offloop.checkpoint()
        return 7

    assert await offloop.run(short) == 7
    offloop.checkpoint()
