"""The launcher's children die with it, however it dies (issue 20: a SIGKILLed launcher left every
service running and holding its port)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LAUNCHER = """
import sys, time
from services.stack import child_process
child = child_process(["sleep", "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has died
    except FileNotFoundError:
        return False


def test_a_service_dies_when_its_launcher_is_killed() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=ROOT, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert launcher.stdout is not None
    child = int(launcher.stdout.readline())
    assert alive(child)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the service outlived its launcher"


def test_a_crashed_process_is_restarted_with_backoff_until_it_keeps_crashing(tmp_path: Path) -> None:
    """Each crash within the window doubles the wait before the next start; one crash more than the
    limit stops the stack, naming the process and its last output."""
    from services.stack import Restarts, Stack, StackError

    stack = Stack(env={"PARLEY_DATA_DIR": str(tmp_path)}, log_dir=tmp_path,
                  restarts=Restarts(first_delay=1, max_delay=4, window=60, limit=4))
    stack._spawn("flaky", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    now, delays = 1000.0, []
    for _ in range(4):
        stack.processes[-1].popen.wait()
        said = stack.supervise(now)
        assert "flaky exited with code 3" in said[0], said
        delays.append(float(said[0].rsplit("restarting flaky in ", 1)[1].split(" s")[0]))
        assert stack.supervise(now + delays[-1] - 0.01) == []  # not yet
        assert stack.supervise(now + delays[-1]) == ["restarted flaky"]
        now += delays[-1]
    assert delays == [1, 2, 4, 4]
    stack.processes[-1].popen.wait()
    try:
        stack.supervise(now)
    except StackError as exc:
        assert "flaky crashed 5 times within 60 s" in str(exc)
    else:
        raise AssertionError("a fifth crash within the window did not stop the stack")


def test_crashes_older_than_the_window_are_forgotten(tmp_path: Path) -> None:
    from services.stack import Restarts, Stack

    stack = Stack(env={"PARLEY_DATA_DIR": str(tmp_path)}, log_dir=tmp_path,
                  restarts=Restarts(first_delay=1, max_delay=8, window=10, limit=2))
    stack._spawn("flaky", [sys.executable, "-c", "raise SystemExit(1)"])
    now = 0.0
    for _ in range(6):  # one crash every 20 s: never more than one within the window
        stack.processes[-1].popen.wait()
        assert "restarting flaky in 1 s" in stack.supervise(now)[0]
        assert stack.supervise(now + 1) == ["restarted flaky"]
        now += 20
    stack.processes[-1].popen.wait()


def test_a_configuration_error_stops_the_stack_at_once(tmp_path: Path) -> None:
    from services.stack import Stack, StackError

    stack = Stack(env={"PARLEY_DATA_DIR": str(tmp_path)}, log_dir=tmp_path)
    stack._spawn("auth", [sys.executable, "-c", "print('auth: configuration error: PARLEY_X'); raise SystemExit(2)"])
    stack.processes[-1].popen.wait()
    time.sleep(0.1)  # the output reaches the tail
    try:
        stack.supervise()
    except StackError as exc:
        assert "auth exited with code 2" in str(exc) and "configuration error" in str(exc)
    else:
        raise AssertionError("a bad setting was retried")
