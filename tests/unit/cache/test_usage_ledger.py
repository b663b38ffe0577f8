"""The usage ledger on a real SQLite file and a real PostgreSQL database: the in-memory aggregate
and its flush (one row per day, user, key and model; a failed flush loses nothing), and GET
/v1/usage's report: daily buckets, groups, pages and its checks."""

from __future__ import annotations

from datetime import UTC, date, datetime
from collections.abc import Iterator

import pytest

from services.cache.ledger import UsageLedger
from services.cache.usage_report import Query, UsageReports
from services.cache.usage_store import Counts, UsageStore
from services.core.database import Location
from services.core.errors import InvalidArgument
from tests.unit.cache.conftest import Clock

DAY = 86_400


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
def store(database: Location) -> Iterator[UsageStore]:
    opened = UsageStore(database)
    yield opened
    opened.close()


def generated(prompt: int, completion: int, reused: int = 0) -> Counts:
    return Counts(1, prompt, completion, reused)


def rows(store: UsageStore) -> list[tuple]:
    found = store.db.read("SELECT * FROM usage_daily ORDER BY day, user_id, api_key_id, model")
    return [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in found]


async def test_the_aggregate_flushes_as_one_row_per_day_user_key_and_model(store: UsageStore) -> None:
    clock = Clock(at("2026-12-06T23:59:59"))
    ledger = UsageLedger(store, 1.0, clock)
    ledger.add("alice", "k1", "smol", generated(10, 5, 4))
    ledger.add("alice", "k1", "smol", generated(20, 7))
    ledger.add("alice", "k1", "smol", Counts(cached_requests=1, cached_tokens=30))  # a replayed answer
    ledger.add("alice", "", "embed", generated(8, 0))
    ledger.add("bob", "", "smol", generated(1, 1))
    assert rows(store) == []  # nothing is written on the request path
    assert await ledger.flush() == 3
    clock.now += 2  # the next UTC day
    ledger.add("alice", "k1", "smol", generated(3, 3))
    await ledger.flush()
    ledger.add("alice", "k1", "smol", generated(1, 1))
    await ledger.flush()  # adds to the day's row
    assert rows(store) == [
        ("2026-12-06", "alice", "", "embed", 1, 8, 0, 0, 0, 0),
        ("2026-12-06", "alice", "k1", "smol", 2, 30, 12, 4, 1, 30),
        ("2026-12-06", "bob", "", "smol", 1, 1, 1, 0, 0, 0),
        ("2026-12-07", "alice", "k1", "smol", 2, 4, 4, 0, 0, 0),
    ]
    assert await ledger.flush() == 0
    # What the budgets are re-seeded from: generated tokens only, pending ones included.
    ledger.add("alice", "k2", "smol", generated(100, 0))
    dec = (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert await ledger.tokens("alice", *dec) == 8 + 42 + 8 + 100
    assert await ledger.tokens("alice", datetime(2026, 12, 7, tzinfo=UTC), datetime(2026, 12, 8, tzinfo=UTC)) == 108


async def test_a_failed_flush_keeps_its_rows_for_the_next(store: UsageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = UsageLedger(store, 1.0, Clock(at("2026-12-06T10:00:00")))
    ledger.add("alice", "", "smol", generated(10, 5))
    real_add = store.add

    def unreachable(batch: list) -> None:
        raise OSError("database unreachable")

    monkeypatch.setattr(store, "add", unreachable)
    assert await ledger.flush() == 0
    ledger.add("alice", "", "smol", generated(1, 1))
    monkeypatch.setattr(store, "add", real_add)
    assert await ledger.flush() == 1
    assert rows(store) == [("2026-12-06", "alice", "", "smol", 2, 11, 6, 0, 0, 0)]


async def test_close_writes_what_is_pending(store: UsageStore) -> None:
    ledger = UsageLedger(store, 3600, Clock(at("2026-12-06T10:00:00")))
    ledger.start()
    ledger.add("alice", "", "smol", generated(2, 2))
    await ledger.close()
    assert len(rows(store)) == 1


@pytest.fixture
async def reports(store: UsageStore) -> UsageReports:
    clock = Clock(at("2026-12-03T10:00:00"))
    ledger = UsageLedger(store, 1.0, clock)
    ledger.add("alice", "k1", "smol", generated(10, 5))
    clock.now = at("2026-12-05T10:00:00")
    ledger.add("alice", "k1", "smol", generated(20, 7, 6))
    ledger.add("alice", "k2", "smol", generated(1, 2))
    ledger.add("alice", "k2", "embed", generated(8, 0))
    ledger.add("alice", "k2", "smol", Counts(cached_requests=1, cached_tokens=9))
    ledger.add("bob", "", "smol", generated(100, 100))
    await ledger.flush()  # (the report flushes too)
    clock.now = at("2026-12-06T10:00:00")
    return UsageReports(ledger, clock)


async def test_daily_buckets_grouped_by_model(reports: UsageReports) -> None:
    page = await reports.page(Query(group_by=["model"]), "alice")  # default: the last 7 days
    assert [b.start for b in page.buckets] == [int(at("2026-11-30T00:00:00")) + i * DAY for i in range(7)]
    assert all(b.end - b.start == DAY for b in page.buckets) and page.next_page is None
    by_day = {datetime.fromtimestamp(b.start, UTC).date(): b.lines for b in page.buckets if b.lines}
    assert list(by_day) == [date(2026, 12, 3), date(2026, 12, 5)]
    fifth = {line.groups["model"]: line.counts for line in by_day[date(2026, 12, 5)]}
    assert fifth["smol"] == Counts(2, 21, 9, 6, 1, 9) and fifth["embed"] == Counts(1, 8, 0, 0, 0, 0)


async def test_groups_users_and_pages(reports: UsageReports) -> None:
    start = int(at("2026-12-05T00:00:00"))
    one_day = Query(start_time=start, end_time=start + DAY, group_by=["api_key_id,model"])
    lines = (await reports.page(one_day, "alice")).buckets[0].lines
    assert {(l.groups["api_key_id"], l.groups["model"], l.counts.requests) for l in lines} == {
        ("k1", "smol", 1), ("k2", "smol", 1), ("k2", "embed", 1)}
    everyone = (await reports.page(Query(start_time=start, end_time=start + DAY, group_by=["user_id"]), None))
    assert {l.groups["user_id"]: l.counts.output_tokens for l in everyone.buckets[0].lines} == {"alice": 9, "bob": 100}
    ungrouped = (await reports.page(Query(start_time=start, end_time=start + DAY), "alice")).buckets[0].lines
    assert len(ungrouped) == 1 and ungrouped[0].groups == {} and ungrouped[0].counts.input_tokens == 29

    first = await reports.page(Query(start_time=int(at("2026-12-01T12:00:00")), limit=3), "alice")
    assert len(first.buckets) == 3 and first.next_page == str(int(at("2026-12-04T00:00:00")))
    second = await reports.page(Query(start_time=int(at("2026-12-01T12:00:00")), limit=3, page=first.next_page),
                                "alice")
    assert [len(b.lines) for b in second.buckets] == [0, 1, 0] and second.next_page is None  # up to today


async def test_the_default_range_starts_no_earlier_than_1970(reports: UsageReports) -> None:
    page = await reports.page(Query(end_time=6287), "alice")
    assert [(b.start, b.end) for b in page.buckets] == [(0, DAY)]


@pytest.mark.parametrize("query, message", [
    (Query(bucket_width="1h"), "bucket_width"),
    (Query(limit=32), "limit"),
    (Query(start_time=-1), "start_time"),
    (Query(end_time=10**12), "end_time"),
    (Query(start_time=200, end_time=100), "after start_time"),
    (Query(start_time=int(at("2027-01-01T00:00:00"))), "after start_time"),  # the default end is now
    (Query(group_by=["project_id"]), "group_by"),
    (Query(page="tomorrow"), "page"),
    (Query(page="1"), "outside"),
])
async def test_bad_queries_are_invalid_arguments(reports: UsageReports, query: Query, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await reports.page(query, "alice")
