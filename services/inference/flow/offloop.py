"""A request's blocking work (rendering a chat, tokenizing it) in a thread that stops when the
request does.

asyncio.to_thread cannot stop its thread: a caller that left would leave it working to the end
(issue 20: abandoned token counts held a core for minutes). run() hands the thread a flag that the
caller's cancellation sets, through a context variable (to_thread copies the caller's context); the
work calls checkpoint() between its pieces (each render, each message's tokens), each of which the
request limits keep short, and stops at the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The request this work was for has gone."""


_stop: ContextVar[list[bool] | None] = ContextVar("parley_offloop_stop", default=None)


def checkpoint() -> None:
    """Raises Stopped when the request behind the current thread's work was cancelled."""
    flag = _stop.get()
    if flag is not None and flag[0]:
        raise Stopped


async def run(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread; cancelling the caller stops it at its next checkpoint()."""
    flag = [False]
    token = _stop.set(flag)
    try:
        return await asyncio.to_thread(fn, *args)
    except asyncio.CancelledError:
        flag[0] = True
        raise
    finally:
        _stop.reset(token)
