"""What happens to the stack while the users run: the fault schedule (SIGKILL of each process in turn,
Redis killed and started again), the launcher's supervision (Stack.supervise, as `make run` does),
and samples of each process's resources from /proc."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.stack import Stack, StackError
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer

TARGETS = ("auth", "session", "cache", "inference", "gateway", "redis")
# On PostgreSQL, with two session replicas: the second replica is killed too (while it holds turns: the
# users' turns are balanced over both), and the database is stopped and started again.
POSTGRES_TARGETS = TARGETS + ("session-2", "postgres")
REDIS_DOWN_SECONDS = 5.0
POSTGRES_DOWN_SECONDS = 5.0


@dataclass
class Fault:
    target: str
    at: float  # seconds since the run started
    until: float  # when the fault ended: the kill itself, or Redis started again
    detail: str = ""
    healthy_after: float | None = None  # seconds from `until` to /healthz 200 again


def plan(duration: float, targets: tuple[str, ...] = TARGETS) -> list[tuple[float, str]]:
    """Each target once, evenly spread over the middle of the run (20%-80%): a warm-up before the
    first and a quiet stretch after the last, for the resource series and the lease check."""
    step = 0.6 * duration / (len(targets) - 1)
    return [(0.2 * duration + i * step, target) for i, target in enumerate(targets)]


class Faults:
    def __init__(self, stack: Stack, redis: RedisServer, clock: Callable[[], float],
                 postgres: PostgresServer | None = None) -> None:
        self.stack, self.redis, self.clock, self.postgres = stack, redis, clock, postgres
        self.log: list[Fault] = []
        self.supervision: list[str] = []

    async def run(self, schedule: list[tuple[float, str]]) -> None:
        for at, target in schedule:
            await asyncio.sleep(max(0.0, at - self.clock()))
            if target == "redis":
                fault = await self.outage("redis", self.redis.kill, self.redis.start, REDIS_DOWN_SECONDS)
            elif target == "postgres":
                assert self.postgres is not None, "a PostgreSQL fault needs --postgres"
                fault = await self.outage("postgres", self.postgres.stop, self.postgres.start, POSTGRES_DOWN_SECONDS)
            else:
                fault = await self.kill(target)
            self.log.append(fault)
            fault.healthy_after = await self.healthy_again(fault.until)

    async def kill(self, name: str) -> Fault:
        process = next(p for p in self.stack.processes if p.name == name and p.popen.poll() is None)
        os.kill(process.popen.pid, signal.SIGKILL)
        at = self.clock()
        return Fault(name, at, at, f"SIGKILL pid {process.popen.pid}")

    async def outage(self, name: str, stop: Callable[[], None], start: Callable[[], None], seconds: float) -> Fault:
        """A store down for `seconds`: Redis SIGKILLed, PostgreSQL shut down fast (its sessions cut)."""
        at = self.clock()
        await asyncio.to_thread(stop)
        await asyncio.sleep(seconds)
        # On this (the main) thread, not a worker's: the server dies with the thread that started it
        # (PR_SET_PDEATHSIG), and the executor's threads end before the stores are read. A second's pause.
        start()
        how = "SIGKILL" if name == "redis" else "fast shutdown"
        return Fault(name, at, self.clock(), f"{how}, started again after {seconds:g} s")

    async def healthy_again(self, since: float, limit: float = 120.0) -> float | None:
        async with httpx.AsyncClient(timeout=2) as http:
            while self.clock() - since < limit:
                try:
                    if (await http.get(f"{self.stack.url}/healthz")).status_code == 200:
                        return self.clock() - since
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        return None

    async def supervise(self, until: Callable[[], bool]) -> None:
        """The launcher's loop. It runs on the main thread, which must outlive the processes it starts
        (services.stack.child_process: they die with the thread that started them)."""
        while not until():
            try:
                for line in self.stack.supervise():
                    self.supervision.append(f"{self.clock():7.1f} s  {line.splitlines()[0]}")
            except StackError as exc:
                self.supervision.append(f"{self.clock():7.1f} s  STACK STOPPED: {exc}")
                raise
            await asyncio.sleep(0.25)


@dataclass
class Sample:
    at: float
    rss_kib: int
    fds: int
    threads: int


@dataclass
class Series:
    """One process's samples: a restarted process starts a new series."""

    name: str
    pid: int
    samples: list[Sample] = field(default_factory=list)


def sample(pid: int, at: float) -> Sample | None:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return Sample(at, int(fields["VmRSS"].split()[0]), len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]))
    except (OSError, KeyError, ValueError):
        return None  # it died between the listing and the read


async def watch_resources(stack: Stack, clock: Callable[[], float], interval: float, until: Callable[[], bool],
                          series: dict[int, Series]) -> None:
    while not until():
        for process in list(stack.processes):
            if process.popen.poll() is None and (found := sample(process.popen.pid, clock())) is not None:
                series.setdefault(process.popen.pid, Series(process.name, process.popen.pid)).samples.append(found)
        await asyncio.sleep(interval)
