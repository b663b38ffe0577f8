"""The stores of parked KV state (services.inference.engines.kv_store): the disk's least recently
used order by bytes, fingerprints, corrupt and half-written files, and the writer never holding up
its caller. The engine's use of them, with the real model, is in test_batch_engine.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.inference.engines import kv_store
from services.inference.engines.kv_store import DiskKvStore, HostKvStore

STATE = 4096  # bytes of each fake state


def state(fill: int, size: int = STATE) -> bytearray:
    return bytearray([fill % 256]) * size


def tokens(first: int, n: int = 40) -> list[int]:
    return [first] + list(range(1000, 1000 + n - 1))


def written(store: DiskKvStore, count: int) -> None:
    deadline = time.monotonic() + 10
    while store.stats["written"] < count:
        assert time.monotonic() < deadline, f"the writer wrote {store.stats['written']} of {count}"
        time.sleep(0.01)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "kv"


def test_host_store_drops_the_least_recently_parked_over_its_budget() -> None:
    host = HostKvStore(2 * STATE)
    for first in (1, 2, 3):
        host.put(tokens(first), state(first))
    assert len(host) == 2 and host.bytes == 2 * STATE
    assert host.best(tokens(1))[1] == 0  # the first went
    key, k = host.best(tokens(3) + [7, 8])
    assert k == 40 and host.take(key)[0] == tokens(3)


def test_disk_keeps_the_most_recently_used_within_its_budget_and_a_restart_finds_them(directory: Path) -> None:
    size = len(b"".join(bytes(p) for p in kv_store.encode("fp", tokens(1), state(1))))
    budget = 2 * size + 16  # two files (headers differ by a few digits), not three
    store = DiskKvStore(directory, budget, "fp")
    store.save(tokens(1), state(1))
    store.save(tokens(2), state(2))
    written(store, 2)
    entry, k = store.best(tokens(1) + [5])
    assert k == 40 and bytes(store.load(entry)) == bytes(state(1))  # a load makes it the most recent
    store.save(tokens(3), state(3))
    written(store, 3)
    assert store.best(tokens(2))[1] == 0 and store.bytes <= budget
    assert len(files(directory)) == 2
    store.close()

    again = DiskKvStore(directory, budget, "fp")  # a restart: the directory is indexed
    for first in (1, 3):
        entry, k = again.best(tokens(first))
        assert k == 40 and bytes(again.load(entry)) == bytes(state(first))
    again.close()


def test_a_longer_state_of_the_same_conversation_replaces_the_shorter(directory: Path) -> None:
    store = DiskKvStore(directory, 2**20, "fp")
    store.save(tokens(1), state(1))
    written(store, 1)
    store.save(tokens(1) + [7, 8, 9], state(2))
    written(store, 2)
    assert len(store) == 1 and len(files(directory)) == 1
    entry, k = store.best(tokens(1) + [7, 8, 9, 10])
    assert k == 43 and bytes(store.load(entry)) == bytes(state(2))
    store.close()


def test_another_models_states_are_never_loaded(directory: Path) -> None:
    store = DiskKvStore(directory, 2**20, "model-a")
    store.save(tokens(1), state(1))
    written(store, 1)
    store.close()
    other = DiskKvStore(directory, 2**20, "model-b")
    assert other.best(tokens(1)) == (None, 0)
    assert len(files(directory)) == 1 and other.bytes > 0  # kept for model-a, counted against the budget
    other.close()


@pytest.mark.parametrize("damage", ["truncated", "flipped state byte", "garbage", "longer"])
def test_a_damaged_file_is_ignored_and_deleted(directory: Path, damage: str) -> None:
    store = DiskKvStore(directory, 2**20, "fp")
    store.save(tokens(1), state(1))
    written(store, 1)
    store.close()
    (name,) = files(directory)
    path = directory / name
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:-100]
    elif damage == "flipped state byte":
        raw[-10] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"not a state file at all")
    else:
        raw += b"\0"
    path.write_bytes(bytes(raw))
    again = DiskKvStore(directory, 2**20, "fp")
    entry, _ = again.best(tokens(1))
    if entry is not None:  # the header and sizes agree: the checksum finds it when loaded
        assert again.load(entry) is None
    assert again.best(tokens(1)) == (None, 0)
    assert files(directory) == [] and again.stats["corrupt"] == 1
    again.close()


WRITER_KILLED_MID_WRITE = """
import os, sys, time
from services.inference.engines.kv_store import DiskKvStore
def stall(*args):
    print("writing", flush=True)
    time.sleep(60)
os.replace = stall  # the file is written but not yet renamed into place when the process dies
store = DiskKvStore(sys.argv[1], 2**30, "fp")
store.save(list(range(100, 200)), bytearray(b"x") * 2**20)
time.sleep(60)
"""


def test_a_writer_killed_mid_write_leaves_no_readable_partial_file(directory: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER_KILLED_MID_WRITE, str(directory)],
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    (partial,) = files(directory)
    assert ".tmp-" in partial and not partial.endswith(kv_store.SUFFIX)
    store = DiskKvStore(directory, 2**30, "fp")
    assert len(store) == 0 and store.best(list(range(100, 200))) == (None, 0)
    store.close()
    old = time.time() - kv_store.STALE_TEMP_SECONDS - 1
    os.utime(directory / partial, (old, old))
    DiskKvStore(directory, 2**30, "fp").close()  # a dead writer's temporary file goes
    assert files(directory) == []


def test_saving_never_waits_for_the_disk(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_store, "WRITE_QUEUE_BYTES", 2 * STATE)
    store = DiskKvStore(directory, 2**20, "fp")
    disk_free = threading.Event()
    real_write = store._write
    monkeypatch.setattr(store, "_write", lambda *args: (disk_free.wait(), real_write(*args)))
    began = time.monotonic()
    saved = [store.save(tokens(first), state(first)) for first in range(1, 6)]
    assert time.monotonic() - began < 0.5
    assert saved[:2] == [True, True] and not any(saved[3:]) and store.stats["dropped"] >= 3
    disk_free.set()
    store.close(timeout=10)
    assert store.stats["written"] == saved.count(True)


def test_a_replica_finds_states_another_wrote_after_it_started(directory: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_store, "RESCAN_SECONDS", 0.05)
    reader = DiskKvStore(directory, 2**20, "fp")
    writer = DiskKvStore(directory, 2**20, "fp")
    writer.save(tokens(4), state(4))
    written(writer, 1)
    deadline = time.monotonic() + 5
    while reader.best(tokens(4))[1] == 0:
        assert time.monotonic() < deadline, "the reader never indexed the other replica's file"
        time.sleep(0.02)
    entry, _ = reader.best(tokens(4))
    assert bytes(reader.load(entry)) == bytes(state(4))
    reader.close()
    writer.close()


def test_the_fingerprint_changes_with_the_model_file_and_the_context(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    first = kv_store.fingerprint(str(model), n_ctx=4096, type_k=1)
    assert kv_store.fingerprint(str(model), n_ctx=4096, type_k=1) == first
    assert kv_store.fingerprint(str(model), n_ctx=8192, type_k=1) != first
    assert kv_store.fingerprint(str(model), n_ctx=4096, type_k=8) != first
    os.utime(model, ns=(1, 1))  # the same name and size, rewritten
    assert kv_store.fingerprint(str(model), n_ctx=4096, type_k=1) != first


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priority is Linux's")
def test_the_writer_yields_the_cpu_to_decoding(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    store = DiskKvStore(directory, 2**20, "fp")
    writing, done = threading.Event(), threading.Event()
    real_write = store._write
    monkeypatch.setattr(store, "_write", lambda *args: (writing.set(), done.wait(), real_write(*args)))
    assert store.save(tokens(1), state(1))
    assert writing.wait(10)
    assert os.getpriority(os.PRIO_PROCESS, store._writer.native_id) == 19  # the lowest
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # this thread's is its own
    done.set()
    store.close(timeout=10)
    assert store.stats["written"] == 1
