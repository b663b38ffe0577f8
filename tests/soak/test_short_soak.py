"""The soak with injected faults (bench/soak), short: 10 users for 2 minutes on the SQLite stack while
auth, session, cache, inference and Envoy are each SIGKILLed once and Redis is killed and started again;
then the invariants are read from the stores (every acknowledged message stored once, answers complete
or marked, no conversation left locked, no 5xx away from a fault, refreshes, revoked keys, recovery,
no process left). The harness exits non-zero when one fails; its table is the failure message.

The long runs (40 users, 20 minutes, and --postgres with two session replicas) are `make soak`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINUTES = 2
USERS = 10


@pytest.mark.timeout(MINUTES * 60 + 300)  # the stack's start and stop, and the lease probe after the users
def test_ten_users_for_two_minutes_under_one_fault_of_each_kind(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--users", str(USERS), "--minutes", str(MINUTES),
         "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=MINUTES * 60 + 280)
    report = run.stdout[-8000:] + ("\n" + run.stderr[-4000:] if run.returncode else "")
    assert run.returncode == 0, f"the soak failed (services' logs in {tmp_path / 'logs'}):\n{report}"
    assert "harness errors" in run.stdout and "fault log" in run.stdout, report
    for target in ("auth", "session", "cache", "inference", "gateway", "redis"):
        assert f"  {target} " in run.stdout.split("fault log", 1)[1], f"no {target} fault in the log:\n{report}"
