"""The checks at the end of a soak run: what the stores hold against what the server acknowledged, the
errors and latencies away from the faults, each process's resources, and what is left after the stack
stops. Each check is one row (name, value, bound, pass); the table is printed with the fault log."""

from __future__ import annotations

import re
import sqlite3
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.soak.faults import Fault, Series
from bench.soak.users import MODEL_WORK, Journal, Request

NONCE = re.compile(r"\[(soak\d{3}-[0-9a-f]{6}#\d+)\]")
STATUSES = ("complete", "incomplete", "error")
LEDGER_FLUSH_SECONDS = 1.0  # PARLEY_USAGE_FLUSH_SECONDS: what a killed cache service may lose


@dataclass
class Check:
    name: str
    value: str
    bound: str
    ok: bool


def query(data_dir: Path, database_url: str, database: str, sql: str) -> list[dict[str, Any]]:
    """Rows of one service's store, read from the store itself: `<database>.db` opened read-only, or
    the `parley_<database>` schema on PostgreSQL."""
    if database_url:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(database_url, row_factory=dict_row) as connection:
            connection.execute(f"SET search_path TO parley_{database}")
            return list(connection.execute(sql).fetchall())
    connection = sqlite3.connect(f"file:{data_dir / f'{database}.db'}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(sql)]
    finally:
        connection.close()


def stored_messages(data_dir: Path, database_url: str = "") -> list[dict[str, Any]]:
    """Every message in the session store."""
    return query(data_dir, database_url, "session",
                 "SELECT id, session_id, role, content, status, error, tool_calls FROM messages ORDER BY seq")


def ledger_requests(data_dir: Path, database_url: str = "") -> int:
    """The requests the usage ledger holds (cache service), replayed answers included."""
    rows = query(data_dir, database_url, "usage",
                 "SELECT COALESCE(SUM(requests + cached_requests), 0) AS n FROM usage_daily")
    return int(rows[0]["n"])


def near(request: Request, faults: Iterable[Fault], window: float) -> bool:
    """Whether the request was in flight during a fault or within `window` seconds after it ended."""
    return any(request.start <= f.until + window and (request.end or request.start) >= f.at for f in faults)


def user_messages(journal: Journal, rows: list[dict[str, Any]]) -> Check:
    """Every acknowledged user message is stored once in its conversation (a Responses fork copies
    history into a new conversation: counted per conversation); an unacknowledged one at most once."""
    counts = Counter((m.group(1), row["session_id"]) for row in rows if row["role"] == "user"
                     for m in [NONCE.search(row["content"])] if m)
    per_nonce: dict[str, list[int]] = {}
    for (nonce, _), count in counts.items():
        per_nonce.setdefault(nonce, []).append(count)
    acked = [n.strip("[]") for n, ok in journal.nonces if ok]
    missing = [n for n in acked if n not in per_nonce]
    doubled = [n for n, found in per_nonce.items() if max(found) > 1]
    value = f"{len(acked)} acknowledged: {len(missing)} missing, {len(doubled)} stored twice"
    if missing or doubled:
        value += f" (e.g. {(missing + doubled)[:2]})"
    return Check("acknowledged user messages stored exactly once", value, "0 missing, 0 twice",
                 not missing and not doubled)


def assistant_messages(rows: list[dict[str, Any]]) -> Check:
    """Every stored answer is complete, or incomplete, or an error with its reason."""
    answers = [r for r in rows if r["role"] == "assistant"]
    bad = [r["id"] for r in answers if r["status"] not in STATUSES or (r["status"] == "error" and not r["error"])]
    by_status = Counter(r["status"] for r in answers)
    value = f"{len(answers)}: " + ", ".join(f"{by_status[s]} {s}" for s in STATUSES) + f"; {len(bad)} other"
    return Check("stored answers complete, incomplete or error", value, "0 other", not bad)


def answers_match(journal: Journal, rows: list[dict[str, Any]]) -> Check:
    """What the client received agrees with what is stored: a session turn the client read to its
    end is complete with exactly that text; a stopped, abandoned or failed one is stored as a prefix
    of what the client saw or the other way round (the server may have generated more after the
    client left, or kept only its last checkpoint when it crashed)."""
    by_id = {r["id"]: r for r in rows}
    wrong = []
    for turn in journal.turns:
        row = by_id.get(turn.assistant_id)
        if row is None:
            wrong.append(f"{turn.nonce}: answer {turn.assistant_id} not stored")
        elif turn.ending == "done" and turn.kind != "response" and (row["status"] != "complete" or row["content"] != turn.text):
            wrong.append(f"{turn.nonce}: read to its end, stored {row['status']} {row['content'][:30]!r}")
        elif turn.ending == "done" and row["content"] != turn.text:
            wrong.append(f"{turn.nonce}: response stored {row['content'][:30]!r}, client got {turn.text[:30]!r}")
        elif not (row["content"].startswith(turn.text) or turn.text.startswith(row["content"])):
            wrong.append(f"{turn.nonce}: {turn.ending}, stored {row['content'][:30]!r}, client {turn.text[:30]!r}")
    endings = Counter(t.ending for t in journal.turns)
    value = f"{len(journal.turns)} turns ({', '.join(f'{n} {e}' for e, n in sorted(endings.items()))}): {len(wrong)} differ"
    if wrong:
        value += f" (e.g. {wrong[0]})"
    return Check("stored answers = what the client received", value, "0 differ", not wrong)


def ledger(journal: Journal, faults: list[Fault], window: float, recorded: int, probes: int) -> Check:
    """The usage ledger against what the clients saw: at least every model request answered away from
    the faults that may lose records (the cache killed: the last second's aggregate; inference killed:
    its records on their way), at most every model request sent (and the probes after the run)."""
    sent = [r for r in journal.requests if r.kind in MODEL_WORK]
    lossy = [f for f in faults if f.target in ("cache", "inference")]
    surely = [r for r in sent if r.outcome == "ok"
              and not any(f.at - LEDGER_FLUSH_SECONDS <= r.end <= f.until + window for f in lossy)]
    most = len(sent) + probes
    return Check("usage ledger's requests: answered <= recorded <= sent", f"{len(surely)} <= {recorded} <= {most}",
                 "both hold", len(surely) <= recorded <= most)


def leases(probed: list[tuple[str, int]]) -> Check:
    locked = [sid for sid, status in probed if status == 409]
    other = [(sid, status) for sid, status in probed if status not in (200, 409)]
    value = f"{len(probed)} conversations: {len(locked)} locked" + (f", {len(other)} other answers {other[:2]}" if other else "")
    return Check("no conversation left locked (a turn after the run)", value, "0 locked", not locked and not other)


def server_errors(journal: Journal, faults: list[Fault], window: float) -> Check:
    failed = [r for r in journal.requests if r.outcome == "server"]
    outside = [r for r in failed if not near(r, faults, window)]
    value = f"{len(outside)} of {len(failed)}"
    if outside:
        r = outside[0]
        value += f" (e.g. {r.kind} at {r.start:.1f} s: {r.status} {r.detail[:80]})"
    return Check(f"5xx / cut / hung requests > {window:g} s after a fault", value, "0", not outside)


def refusals(journal: Journal, faults: list[Fault], window: float) -> Check:
    """4xx other than 409/429 away from faults: the harness sends only valid requests."""
    refused = [r for r in journal.requests if r.outcome == "refused" and not near(r, faults, window)]
    value = str(len(refused)) + (f" (e.g. {refused[0].kind} {refused[0].status} {refused[0].detail[:80]})" if refused else "")
    return Check("unexpected 4xx away from faults", value, "0", not refused)


def latency(journal: Journal, faults: list[Fault], window: float, bound: float, model_work: bool) -> Check:
    """Time to the first token of a stream, to the whole answer otherwise; successful requests away
    from faults, those that run a model (`model_work`: they queue for the engine) or the others (which
    must stay quick however busy the engine is)."""
    what = "requests that run a model" if model_work else "other requests (auth, keys, records)"
    times = sorted(r.latency for r in journal.requests if r.outcome == "ok" and r.end and not near(r, faults, window)
                   and (r.kind in MODEL_WORK) == model_work)
    name = f"p99 latency away from faults: {what}"
    if not times:
        return Check(name, "no requests", f"<= {bound:g} s", False)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    return Check(name, f"{p99:.2f} s (p50 {statistics.median(times):.2f} s, n={len(times)})", f"<= {bound:g} s",
                 p99 <= bound)


def refreshes(journal: Journal, faults: list[Fault], window: float) -> Check:
    counted = [(a, b, same) for a, b, same in journal.refreshes if not near(a, faults, window) and not near(b, faults, window)]
    agree = sum(same for _, _, same in counted)
    return Check("two concurrent refreshes get one successor", f"{agree}/{len(counted)}", "all", agree == len(counted))


def revoked_keys(journal: Journal, faults: list[Fault], window: float) -> Check:
    counted = [r for r in journal.revoked if not near(r, faults, window)]
    refused = sum(r.status == 401 for r in counted)
    return Check("revoked API keys refused (after the key cache)", f"{refused}/{len(counted)}", "all", refused == len(counted))


def recovery(faults: list[Fault], window: float) -> Check:
    slowest = max((f.healthy_after if f.healthy_after is not None else float("inf") for f in faults), default=0.0)
    return Check("/healthz 200 again after each fault", f"{len(faults)} faults, slowest {slowest:.1f} s",
                 f"<= {window:g} s", slowest <= window)


def growth(series: Iterable[Series], warm_up: float, span: float = 120.0) -> list[Check]:
    """Per service: RSS, open fds and threads of the last samples (median of three) against the
    highest of the first half after warm-up, over each process's own series (a restarted process
    starts a new one): pools that fill up once and then hold (argon2's memory, executor threads)
    count as warm-up, a steady climb does not. A series with less than `span` seconds after its
    warm-up is too short to judge and left out."""
    worst: dict[str, dict[str, float]] = {}
    judged: Counter[str] = Counter()
    for one in series:
        if not one.samples:
            continue
        start = one.samples[0].at + warm_up
        after = [s for s in one.samples if s.at >= start]
        worst.setdefault(one.name, {})
        if len(after) < 6 or after[-1].at - after[0].at < span:
            continue
        judged[one.name] += 1
        for metric in ("rss_kib", "fds", "threads"):
            base = max(getattr(s, metric) for s in after[:len(after) // 2])
            last = statistics.median(getattr(s, metric) for s in after[-3:])
            change = (last - base) / base if base else 0.0
            worst[one.name][metric] = max(worst[one.name].get(metric, float("-inf")), change)
    checks = []
    for name, metrics in sorted(worst.items()):
        if not judged[name]:
            checks.append(Check(f"{name}: RSS, fds, threads growth", f"no series {span:.0f} s past warm-up",
                                "<= +10% each", True))
            continue
        value = ", ".join(f"{label} {metrics[m]:+.1%}" for m, label in (("rss_kib", "RSS"), ("fds", "fds"),
                                                                      ("threads", "threads")))
        checks.append(Check(f"{name}: RSS, fds, threads growth", f"{value} ({judged[name]} series)",
                            "<= +10% each", all(v <= 0.10 for v in metrics.values())))
    return checks


def harness(journal: Journal) -> Check:
    value = str(len(journal.harness_errors)) + (f" ({journal.harness_errors[0][:100]})" if journal.harness_errors else "")
    return Check("harness errors", value, "0", not journal.harness_errors)


def print_report(checks: list[Check], faults: list[Fault], supervision: list[str], journal: Journal) -> None:
    outcomes = Counter(r.outcome for r in journal.requests)
    print(f"\nrequests: {len(journal.requests)} ({', '.join(f'{n} {o}' for o, n in outcomes.most_common())})")
    width = max(len(c.name) for c in checks)
    print(f"\n{'invariant':{width}}  {'value':60}  {'bound':>14}  result")
    for c in checks:
        print(f"{c.name:{width}}  {c.value:60}  {c.bound:>14}  {'pass' if c.ok else 'FAIL'}")
    print("\nfault log (seconds since the users started)")
    for f in faults:
        back = f"{f.healthy_after:.1f} s" if f.healthy_after is not None else "never"
        print(f"{f.at:7.1f} s  {f.target:9}  {f.detail}; /healthz 200 {back} after")
    if supervision:
        print("\nlauncher")
        for line in supervision:
            print(line)
