"""A real PostgreSQL server for tests: Debian's `postgresql` binaries (`make test` installs the
package when missing), a throwaway cluster in a temp dir, on a free loopback port and a unix socket
in that dir, with a password (scram-sha-256) so URLs carry one as they do in production.

PostgreSQL refuses to run as root, and CI runs as root: then initdb and the server run as the
`postgres` user the package creates. The server gets SIGINT (fast shutdown) when the test process
dies, however it dies, so none outlives the tests. Durability is off (fsync) — it is a test server.
Tests stop it and start it again on the same port to play an outage.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from services.stack import free_port

PR_SET_PDEATHSIG = 1
USER = "parley"


def binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL is not installed: run `make test` (it installs Debian's postgresql package)")


def _as_user(uid: int | None, gid: int | None):  # type: ignore[no-untyped-def]
    def switch() -> None:
        if uid is not None and gid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # After the uid change, which would clear it: the server dies with the test process.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    return switch


class PostgresServer:
    def __init__(self) -> None:
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.password = "pw-" + secrets.token_urlsafe(12)  # URL-safe: goes into URLs as it is
        self.process: subprocess.Popen[bytes] | None = None
        self._uid: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            os.chown(self.root, self._uid, self._gid)
        self._initdb()

    def _run(self, *argv: str) -> None:
        result = subprocess.run(argv, preexec_fn=_as_user(self._uid, self._gid), capture_output=True, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.decode()[-2000:]}")

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._uid is not None:
            os.chown(pwfile, self._uid, self._gid or 0)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions")
        pwfile.unlink()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_as_user(self._uid, self._gid), cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'server.log').read_text()[-2000:]}")
            if self.accepts():
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres not answering on port {self.port}")

    def accepts(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown: sessions are cut, as in an outage."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
