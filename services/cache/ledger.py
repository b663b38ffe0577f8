"""The usage ledger: every metered request's tokens, kept durably off the request path.

RecordUsage adds to an in-memory aggregate (a dict add, no I/O); a background task flushes it to the
usage store (services.cache.usage_store) every PARLEY_USAGE_FLUSH_SECONDS, all rows in one
transaction. A flush that fails (the database unreachable) puts its rows back to be tried again
with the next one; a process killed loses at most what arrived since the last flush. Redis is not
involved: its loss or restart loses nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, date, datetime

from services.cache.usage_store import Counts, Subject, UsageStore

log = logging.getLogger("parley.cache.ledger")

WARNING_INTERVAL_SECONDS = 60.0


def utc_day(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


class UsageLedger:
    def __init__(self, store: UsageStore, flush_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._pending: dict[Subject, Counts] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._last_warning: float | None = None

    def add(self, user_id: str, api_key_id: str, model: str, counts: Counts) -> None:
        subject = Subject(utc_day(self._clock()), user_id, api_key_id, model)
        self._pending.setdefault(subject, Counts()).add(counts)

    async def flush(self) -> int:
        """Writes what is pending; returns how many rows. On failure they stay pending."""
        async with self._flushing:
            rows, self._pending = self._pending, {}
            if not rows:
                return 0
            try:
                await asyncio.to_thread(self.store.add, list(rows.items()))
            except Exception as exc:  # noqa: BLE001 - kept for the next flush, reported below
                for subject, counts in rows.items():
                    self._pending.setdefault(subject, Counts()).add(counts)
                self._warn(exc)
                return 0
            return len(rows)

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= WARNING_INTERVAL_SECONDS:
            self._last_warning = now
            log.warning("the usage ledger could not be written; retrying with the next flush",
                        extra={"fields": {"error": type(exc).__name__, "pending_rows": len(self._pending)}})

    async def tokens(self, user_id: str, start: datetime, end: datetime) -> int:
        """A user's generated tokens in [start, end) (whole UTC days): written and pending."""
        first, stop = start.date(), end.date()
        pending = sum(c.tokens for s, c in self._pending.items() if s.user_id == user_id and first <= s.day < stop)
        return pending + await asyncio.to_thread(self.store.tokens, user_id, first, stop)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-ledger-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    async def close(self) -> None:
        """Stops the flushing task and writes what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
