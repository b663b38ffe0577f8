"""One running turn per session, across every session replica: a lease in the store.

`TurnLeases.hold(session_id)` takes the session's lease (or raises Aborted, HTTP 409), renews it
every third of its lifetime while the turn runs, and gives it back when the turn ends — after the
answer is saved. A replica that dies mid-turn stops renewing: its lease expires within
PARLEY_TURN_LEASE_SECONDS and the next turn may start (the partial answer was checkpointed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.core.errors import Aborted
from services.session.records import SessionStore

log = logging.getLogger("parley.session")

BUSY = "an answer is already being generated in this session; wait for it or stop it first"


class TurnLeases:
    def __init__(self, store: SessionStore, ttl_seconds: float) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds
        self._replica = f"{socket.gethostname()}:{os.getpid()}"

    @asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        holder = f"{self._replica}:{uuid.uuid4().hex[:12]}"
        if not await asyncio.to_thread(self.store.acquire_turn, session_id, holder, self.ttl_seconds):
            raise Aborted(BUSY)
        renewing = asyncio.get_running_loop().create_task(self._renew(session_id, holder))
        try:
            yield
        finally:
            renewing.cancel()
            # Synchronously: this runs while the turn's stream is being cancelled or closed, where
            # an await could be cancelled again. One short write; if it fails the lease expires.
            try:
                self.store.release_turn(session_id, holder)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                log.warning("turn lease not released; it expires by itself",
                            extra={"fields": {"session_id": session_id, "error": type(exc).__name__}})

    async def _renew(self, session_id: str, holder: str) -> None:
        while True:
            await asyncio.sleep(self.ttl_seconds / 3)
            try:
                held = await asyncio.to_thread(self.store.renew_turn, session_id, holder, self.ttl_seconds)
            except Exception as exc:  # noqa: BLE001 - keep trying while the turn runs
                log.warning("turn lease not renewed", extra={"fields": {"session_id": session_id,
                                                                        "error": type(exc).__name__}})
                continue
            if not held:
                log.warning("turn lease lost (it expired and another turn took it)",
                            extra={"fields": {"session_id": session_id}})
                return
