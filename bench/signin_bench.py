"""Sign-in latency: N concurrent Login calls against one auth process with the default argon2 cost
(OWASP's baseline), on SQLite in a temporary data dir or on PARLEY_DATABASE_URL if set.

    python bench/signin_bench.py [--users 50] [--rounds 3]

Each round signs in every user at once (distinct users, one client address, as behind a NAT) and
prints the median, p99 and slowest answer, and the time for one sign-in alone as the baseline the
concurrent ones are compared with: on C cores, N concurrent sign-ins cannot beat N / C of those.
BENCH_PYTHON runs the service under a wrapper, e.g. strace injecting a delay into each fsync to
stand for a slower disk:

    strace -f --seccomp-bpf -qq -o /dev/null -e trace=fsync,fdatasync \
        -e inject=fsync,fdatasync:delay_exit=20000 python "$@"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from parley.auth.v1 import auth_pb2, auth_pb2_grpc

from services.stack import ROOT, child_process, free_port

PASSWORD = "Bench-passphrase-42"


async def wait_ready(stub: auth_pb2_grpc.AuthServiceStub, deadline: float) -> None:
    while True:
        try:
            await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=1)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def timed_login(stub: auth_pb2_grpc.AuthServiceStub, name: str) -> float:
    start = time.perf_counter()
    await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD), timeout=60)
    return time.perf_counter() - start


async def bench(port: int, users: int, rounds: int, failures: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        await wait_ready(stub, time.monotonic() + 60)
        names = [f"bench{i:03d}" for i in range(users)]
        for name in names:
            await stub.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
        for i in range(failures):  # wrong passwords from this address, each for another name
            try:
                await stub.Login(auth_pb2.LoginRequest(username=f"typo{i:03d}", password=PASSWORD), timeout=60)
            except grpc.aio.AioRpcError:
                pass
        alone = statistics.median([await timed_login(stub, names[0]) for _ in range(5)])
        print(f"one sign-in alone: {alone * 1000:.0f} ms (median of 5)")
        for r in range(rounds):
            start = time.perf_counter()
            times = sorted(await asyncio.gather(*(timed_login(stub, n) for n in names)))
            wall = time.perf_counter() - start
            p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
            print(f"round {r + 1}: {users} concurrent sign-ins: median {statistics.median(times):.2f} s, "
                  f"p99 {p99:.2f} s, slowest {times[-1]:.2f} s, all done in {wall:.2f} s "
                  f"({wall / alone:.1f}x one alone)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--failures", type=int, default=0,
                        help="failed sign-ins from the same address before measuring (e.g. a test run earlier)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "PARLEY_DATA_DIR": data_dir, "PARLEY_AUTH_PORT": str(port),
               "PARLEY_AUTH_METRICS_PORT": str(free_port()), "PARLEY_ALLOW_REGISTRATION": "true",
               "PARLEY_LOG_LEVEL": "WARNING"}
        log = open(Path(data_dir) / "auth.log", "wb")
        python = os.environ.get("BENCH_PYTHON", sys.executable)
        process = child_process([python, "-m", "services.auth"], env=env, cwd=ROOT, stdout=log, stderr=log)
        try:
            asyncio.run(bench(port, args.users, args.rounds, args.failures))
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: a wrapper (BENCH_PYTHON) too
            process.wait(10)
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
