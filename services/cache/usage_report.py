"""GET /v1/usage: the ledger's daily sums in the shape of OpenAI's usage API
(GET /v1/organization/usage/completions): a page of daily buckets, each with one result per group.

Every day of the asked range gets a bucket, also an empty one; pages hold `limit` buckets and the
next page starts at the day `next_page` names (its unix seconds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from services.cache.ledger import UsageLedger, utc_day
from services.cache.usage_store import GROUPS, Line
from services.core.errors import InvalidArgument

DAY = timedelta(days=1)
DEFAULT_BUCKETS = 7
MAX_BUCKETS = 31
LATEST = 4_102_444_800  # 2100-01-01: bucket times (uint32 unix seconds) stay in range


@dataclass(frozen=True)
class Query:
    start_time: int = 0  # 0: DEFAULT_BUCKETS days up to end_time
    end_time: int = 0  # 0: now
    bucket_width: str = ""
    group_by: Sequence[str] = ()
    limit: int = 0
    page: str = ""


@dataclass(frozen=True)
class Bucket:
    start: int  # unix seconds
    end: int
    lines: list[Line]


@dataclass(frozen=True)
class Page:
    buckets: list[Bucket]
    next_page: str | None  # None: the last page


def day_start(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def groups_of(values: Sequence[str]) -> list[str]:
    """`group_by` as given (repeated or comma-separated), checked."""
    groups = [g.strip() for value in values for g in value.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise InvalidArgument(f"group_by: unknown {unknown[0][:40]!r}; expected any of {', '.join(GROUPS)}")
    return groups


def days_of(query: Query, now: float) -> tuple[date, date, int]:
    """The page's first day, the range's end (exclusive) and the buckets per page."""
    if query.bucket_width not in ("", "1d"):
        raise InvalidArgument("bucket_width: only 1d is supported")
    limit = query.limit or DEFAULT_BUCKETS
    if not 1 <= limit <= MAX_BUCKETS:
        raise InvalidArgument(f"limit: expected 1 to {MAX_BUCKETS} buckets")
    for name, value in (("start_time", query.start_time), ("end_time", query.end_time)):
        if not 0 <= value <= LATEST:
            raise InvalidArgument(f"{name}: expected unix seconds between 0 and {LATEST}")
    end = query.end_time or min(int(now), LATEST)
    stop = utc_day(end - 1) + DAY if end > 0 else utc_day(0)
    # Never before 1970: bucket times are unsigned.
    first = utc_day(query.start_time) if query.start_time else max(utc_day(0), stop - DEFAULT_BUCKETS * DAY)
    if query.start_time >= end:
        raise InvalidArgument("end_time must be after start_time")
    if query.page:
        try:
            page = utc_day(int(query.page))
        except (ValueError, OverflowError, OSError):
            raise InvalidArgument("page: not a next_page this API gave") from None
        if not first <= page < stop:
            raise InvalidArgument("page: outside the range of start_time and end_time")
        first = page
    return first, stop, limit


class UsageReports:
    def __init__(self, ledger: UsageLedger, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self._clock = clock

    async def page(self, query: Query, user_id: str | None) -> Page:
        """One page of daily buckets of one user's use, or (user_id None) everyone's."""
        groups = groups_of(query.group_by)
        first, stop, limit = days_of(query, self._clock())
        last = min(stop, first + limit * DAY)
        await self.ledger.flush()  # what was just recorded is part of the answer
        lines = await asyncio.to_thread(self.ledger.store.report, first, last, groups, user_id)
        by_day: dict[date, list[Line]] = {}
        for line in lines:
            by_day.setdefault(line.day, []).append(line)
        buckets = []
        day = first
        while day < last:
            buckets.append(Bucket(day_start(day), day_start(day + DAY), by_day.get(day, [])))
            day += DAY
        return Page(buckets, str(day_start(last)) if last < stop else None)
