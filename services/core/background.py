"""Bookkeeping that runs beside a request (storing an answer, recording its tokens): tasks kept
referenced until they finish, so that none is garbage-collected mid-way, and awaited at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def later(self, work: Coroutine[Any, Any, Any]) -> None:
        """Runs `work` beside the caller. create_task copies the context, so the caller's identity
        (and credentials) go along."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float = 2.0) -> None:
        """Lets what was started finish (at most `timeout` seconds)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
