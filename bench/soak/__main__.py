"""Soak test with injected faults: N simulated users for a set time against a whole stack (the bundled
model, Envoy, a real Redis-protocol server; SQLite, or PostgreSQL with --postgres) while each process
is SIGKILLed in turn and Redis is killed and started again; then invariants checked from the stores.

    make soak [SOAK_USERS=40] [SOAK_MINUTES=20] [SOAK_ARGS=--postgres]
    python -m bench.soak --users 10 --minutes 3

Prints one table of invariants (name, value, bound, pass/fail) and the fault log; exits 1 when an
invariant fails. Not part of `make test`. See docs/benchmarks.md, Soak with faults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path


from bench.soak import faults as faults_module
from bench.soak import invariants
from bench.soak.faults import Faults, Series, watch_resources
from bench.soak.users import Journal, User, now_clock
from services.stack import Stack
from tests.integration.test_supervision import stack_processes
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: its modules import each other by name
from inference_bench import stack_environment  # noqa: E402

KEY_CACHE_SECONDS = 3  # PARLEY_API_KEY_CACHE_SECONDS: a revoked key is checked this long (+1 s) after


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--postgres", action="store_true",
                        help="auth and session on a throwaway PostgreSQL, two session replicas; the second replica"
                             " is killed and PostgreSQL stopped and started too")
    parser.add_argument("--fault-window", type=float, default=10,
                        help="seconds after a fault within which errors are forgiven (default 10)")
    parser.add_argument("--p99", type=float, default=30,
                        help="bound of the p99 latency away from faults of requests that run a model (to the first"
                             " token of a stream), seconds")
    parser.add_argument("--p99-other", type=float, default=2,
                        help="bound of the p99 latency away from faults of the other requests, seconds")
    parser.add_argument("--think", type=float, nargs=2, default=(2.0, 10.0), metavar=("MIN", "MAX"),
                        help="seconds a user reads and types between actions (uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default=None,
                        help="keep the services' logs here, and the run's requests and resource samples (JSON)")
    return parser.parse_args()


async def soak(stack: Stack, redis: RedisServer, postgres: PostgresServer | None,
               args: argparse.Namespace) -> tuple[Journal, Faults, dict[int, Series], list]:
    duration = args.minutes * 60
    clock = now_clock()
    journal = Journal(clock)
    faults = Faults(stack, redis, clock, postgres)
    series: dict[int, Series] = {}
    users = [User(i, stack.url, journal, random.Random(args.seed * 1000 + i), duration, tuple(args.think),
                  KEY_CACHE_SECONDS) for i in range(args.users)]
    stagger = min(20.0, 0.1 * duration)  # sign-ups are argon2 hashes: spread them out
    done = False
    background = [asyncio.create_task(faults.supervise(lambda: done)),
                  # Until the users stop: the lease probe afterwards (a sign-in per user at once) is no workload.
                  asyncio.create_task(watch_resources(stack, clock, max(2.0, duration / 90),
                                                      lambda: done or clock() >= duration, series))]
    schedule = asyncio.create_task(faults.run(faults_module.plan(duration, targets(args))))
    try:
        await asyncio.gather(*(u.run(stagger * i / max(1, args.users)) for i, u in enumerate(users)), schedule)
        await asyncio.sleep(3)  # answers the clients left are saved
        probed = [p for found in await asyncio.gather(*(u.probe_sessions() for u in users)) for p in found]
    finally:
        done = True
        schedule.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return journal, faults, series, probed


def targets(args: argparse.Namespace) -> tuple[str, ...]:
    return faults_module.POSTGRES_TARGETS if args.postgres else faults_module.TARGETS


def record(folder: Path, journal: Journal, series: dict[int, Series]) -> None:
    """The raw material of the table, for a closer look: every request and every resource sample."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "soak-requests.json").write_text(json.dumps([dataclasses.asdict(r) for r in journal.requests]))
    (folder / "soak-turns.json").write_text(json.dumps([dataclasses.asdict(t) for t in journal.turns]))
    (folder / "soak-resources.json").write_text(json.dumps([dataclasses.asdict(s) for s in series.values()]))
    print(f"soak: requests, turns and resource samples in {folder}")


def main() -> int:
    args = arguments()
    with contextlib.ExitStack() as cleanup:
        data = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="parley-soak-")))
        redis = RedisServer(data / "redis")
        redis.start()
        cleanup.callback(redis.stop)
        more = {"PARLEY_REDIS_URL": redis.url, "PARLEY_CONTEXT_LENGTH": "2048",
                "PARLEY_API_KEY_CACHE_SECONDS": str(KEY_CACHE_SECONDS), "PARLEY_HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
                "PARLEY_SHUTDOWN_GRACE_SECONDS": "2", "PARLEY_ALLOW_REGISTRATION": "true"}
        database_url, postgres = "", None
        if args.postgres:
            postgres = PostgresServer()
            cleanup.callback(postgres.close)
            postgres.start()
            database_url = more["PARLEY_DATABASE_URL"] = postgres.create_database()
        stack = Stack(env=stack_environment(str(data), **more), log_dir=Path(args.log_dir) if args.log_dir else None,
                      replicas={"session": 2} if args.postgres else None)
        where = "PostgreSQL, two session replicas" if args.postgres else "SQLite"
        print(f"soak: {args.users} users for {args.minutes:g} min on {where}; starting the stack in {data}…", flush=True)
        stack.start()
        try:
            stack.wait_healthy(timeout=300)
            print(f"soak: ready at {stack.url}; fault schedule: "
                  + ", ".join(f"{t} at {at:.0f} s" for at, t in faults_module.plan(args.minutes * 60, targets(args))),
                  flush=True)
            journal, faults, series, probed = asyncio.run(soak(stack, redis, postgres, args))
            rows = invariants.stored_messages(stack.common.data_dir, database_url)
        finally:
            stack.stop()
        recorded = invariants.ledger_requests(stack.common.data_dir, database_url)  # flushed as it stopped
        redis.stop()
        time.sleep(0.5)
        left = stack_processes(data) + ([(redis.port, "redis")] if redis.ping() else [])
        window = args.fault_window
        checks = [
            invariants.user_messages(journal, rows),
            invariants.assistant_messages(rows),
            invariants.answers_match(journal, rows),
            invariants.leases(probed),
            invariants.ledger(journal, faults.log, window, recorded, len(probed)),
            invariants.server_errors(journal, faults.log, window),
            invariants.refusals(journal, faults.log, window),
            invariants.latency(journal, faults.log, window, args.p99, model_work=True),
            invariants.latency(journal, faults.log, window, args.p99_other, model_work=False),
            invariants.refreshes(journal, faults.log, window),
            invariants.revoked_keys(journal, faults.log, window),
            invariants.recovery(faults.log, window),
            *invariants.growth(series.values(), warm_up=max(60.0, 0.15 * args.minutes * 60)),
            invariants.Check("no process left after the stack stops", f"{len(left)} {left[:2]}" if left else "0", "0",
                             not left),
            invariants.harness(journal),
        ]
        invariants.print_report(checks, faults.log, faults.supervision, journal)
        if args.log_dir:
            record(Path(args.log_dir), journal, series)
        return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
