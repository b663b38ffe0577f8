"""The launcher as `make run` runs it (issue 20): a SIGTERM to make's process group always stops the
stack cleanly, a SIGKILLed launcher leaves no service behind, and a crashed service comes back.

Each test runs the real launcher (`python -m services.stack`) under real GNU make, which forwards
a second SIGTERM to the launcher when its group gets one."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import Caller, sign_in, stack_env

ROOT = Path(__file__).resolve().parents[2]
PORTS = ("PARLEY_HTTP_PORT", "PARLEY_AUTH_PORT", "PARLEY_SESSION_PORT", "PARLEY_CACHE_PORT", "PARLEY_INFERENCE_PORT")


class MakeRun:
    """`make run`'s shape: make, in a process group of its own, running the launcher."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir, self.env = data_dir, env
        makefile = data_dir / "Makefile"
        makefile.write_text(f"run:\n\t{sys.executable} -m services.stack\n")
        self.make = subprocess.Popen(["make", "-s", "-f", str(makefile), "run"], cwd=ROOT, env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.make.stdout is not None
        for raw in self.make.stdout:
            with self._seen:
                self.lines.append(raw.decode("utf-8", "replace").rstrip())
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: any(text in line for line in self.lines), timeout):
                raise AssertionError(f"no {text!r} in {timeout:.0f} s; output:\n" + "\n".join(self.lines))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def launcher(self) -> int:
        """The launcher's pid: make's child."""
        return next(pid for pid, _ in stack_processes(self.data_dir) if parent_of(pid) == self.make.pid)


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(") ", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def stack_processes(data_dir: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live process started with this data dir: the launcher and its
    services (their environment says so), zombies left out."""
    marker = f"PARLEY_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(") ", 1)[1][0] == "Z":
                continue
            found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


def port_free(port: int) -> bool:
    """Whether a new server can listen on `port` (as the services do, with SO_REUSEADDR: connections
    the old one closed may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def test_twenty_sigterms_to_makes_process_group_are_twenty_clean_stops(tmp_path: Path) -> None:
    """Stops at points spread over start-up, each a SIGTERM to the group (make forwards a second one):
    the launcher stops every service and says so each time, and nothing is left running."""
    env = stack_env(tmp_path)
    for attempt in range(20):
        run = MakeRun(tmp_path, env)
        run.wait_for("parley: starting", timeout=30)
        time.sleep(0.1 * attempt)
        os.killpg(run.make.pid, signal.SIGTERM)
        try:
            run.make.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.make.pid, signal.SIGKILL)
            raise AssertionError(f"stop {attempt + 1} hung; output:\n{run.output}") from None
        run.wait_for("parley: stopped", timeout=5)
        left = stack_processes(tmp_path)
        assert not left, f"stop {attempt + 1} left {left}"
    assert all(port_free(int(env[name])) for name in PORTS)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRun]:
    data_dir = tmp_path_factory.mktemp("supervised")
    run = MakeRun(data_dir, stack_env(data_dir))
    try:
        run.wait_for("parley: ready", timeout=180)
        yield run
    finally:
        if run.make.poll() is None:
            os.killpg(run.make.pid, signal.SIGTERM)
            run.make.wait(timeout=30)
        for pid, _ in stack_processes(data_dir):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def caller(running: MakeRun) -> Caller:
    return sign_in(f"http://127.0.0.1:{running.env['PARLEY_HTTP_PORT']}", "supervised", "Restart-Pw-1234-x",
                   register=True)


def test_a_killed_inference_service_is_back_within_ten_seconds(running: MakeRun, caller: Caller) -> None:
    """SIGKILL mid-stream: the client of the cut stream gets an error, not a short answer passed off
    as whole; the launcher logs the crash and restarts inference, and new requests succeed."""
    base = f"http://127.0.0.1:{running.env['PARLEY_HTTP_PORT']}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=caller.api_key, max_retries=0, timeout=30)
    (inference, _), = [(pid, cmd) for pid, cmd in stack_processes(running.data_dir) if "services.inference" in cmd]
    stream = client.chat.completions.create(model="smollm2-135m-instruct", stream=True, max_tokens=400,
                                            messages=[{"role": "user", "content": "Write a long story about a dog."}])
    killed = 0.0
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for number, _ in enumerate(stream):
            if number == 2:
                os.kill(inference, signal.SIGKILL)
                killed = time.monotonic()
    deadline = killed + 10
    while True:
        try:
            answer = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=5,
                                                    messages=[{"role": "user", "content": "Hi"}])
            break
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert answer.choices[0].message.content
    assert time.monotonic() - killed < 10
    running.wait_for("restarting inference", timeout=1)
    assert "inference killed by signal 9" in running.output
    assert running.make.poll() is None, "one crash stopped the stack"


def test_a_sigkilled_launcher_leaves_no_service_and_frees_every_port(running: MakeRun) -> None:
    assert len(stack_processes(running.data_dir)) >= 6  # the launcher, four services and Envoy
    os.kill(running.launcher(), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while stack_processes(running.data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stack_processes(running.data_dir), "services outlived their launcher"
    assert all(port_free(int(running.env[name])) for name in PORTS)
