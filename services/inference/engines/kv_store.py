"""Parked conversations' KV state, keyed by the tokens it holds: in host RAM (HostKvStore) and on
disk (DiskKvStore), so that a conversation's next turn after a restart, or on another replica that
shares the directory, evaluates only its new tokens.

The batch scheduler (engines.batch) parks an idle sequence's state (`llama_state_seq_get_data`) in
both; a new prompt restores the entry that shares the longest prefix with it. Host RAM is looked up
first; the disk only when one of its entries shares a longer prefix.

On disk, one file per state, named `<32 hex digits>.kv` (a hash of the fingerprint and the tokens):

    8 bytes    b"PARLEYKV"
    4 bytes    H, the header's length (unsigned, little-endian)
    H bytes    the header, UTF-8 JSON: {"version": 1, "fingerprint": "<hex>", "tokens": n,
               "state_bytes": m, "crc32": <of the state>}
    4n bytes   the tokens the state holds (int32, little-endian)
    m bytes    the state, as llama_state_seq_get_data wrote it

The fingerprint (`fingerprint()`) hashes the model file (path, size, modification time), the
llama.cpp build and the context's settings that shape a state (cells, K/V types, flash attention):
a file with another fingerprint is never loaded, only counted against the byte budget until the
least recently used files go. A file is written by a background thread to `<name>.tmp-…` and
renamed into place once complete, so no reader ever sees half of one; a file that is short, too
long, or whose header or checksum does not match is deleted when found. Files are not fsynced: the
checksum already keeps a file that a crash of the machine cut short from being read back, and on
a VM's disk an fsync took ~30 ms of CPU per 4.6 MB state, taken from decoding on a small machine
(what a crash loses is a cache). The writer runs at the lowest CPU priority for the same reason.
Least recently used (file modification time, touched on every load) goes first when the files
exceed the budget; a state whose tokens extend another's replaces it. Each store indexes the directory when it opens and again every
RESCAN_SECONDS, which is how one replica finds what another wrote.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import mmap
import os
import queue
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.inference.engines.sequence import common_prefix

log = logging.getLogger("parley.engine")

MAGIC = b"PARLEYKV"
VERSION = 1
SUFFIX = ".kv"
RESCAN_SECONDS = 5.0  # how often a store looks for files other replicas wrote (and lost ones)
STALE_TEMP_SECONDS = 600.0  # a temporary file this old belongs to a writer that died
WRITE_QUEUE_BYTES = 256 * 2**20  # states waiting for the writer; beyond this a new one is not saved


class HostKvStore:
    """Parked sequences' KV state in host RAM, keyed by the tokens it holds; least recently parked
    entries go first when the byte budget is exceeded."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[int, tuple[list[int], Any]] = collections.OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], data: Any) -> None:
        size = len(data)
        if size > self.budget:
            return
        while self.bytes + size > self.budget and self._entries:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes -= len(old)
        self._next += 1
        self._entries[self._next] = (tokens, data)
        self.bytes += size

    def best(self, prompt: list[int]) -> tuple[int | None, int]:
        best_key, best_k = None, 0
        for key, (tokens, _) in self._entries.items():
            k = common_prefix(tokens, prompt)
            if k > best_k:
                best_key, best_k = key, k
        return best_key, best_k

    def take(self, key: int) -> tuple[list[int], Any]:
        tokens, data = self._entries.pop(key)
        self.bytes -= len(data)
        return tokens, data


def fingerprint(model_path: str, **facts: Any) -> str:
    """What makes a saved state loadable: the model file and the facts given (the llama.cpp build,
    the context's settings)."""
    stat = os.stat(model_path)
    what = {"model": os.path.realpath(model_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **facts}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class CorruptFile(ValueError):
    """A state file that cannot be what the writer wrote."""


def encode(fingerprint_: str, tokens: list[int], state: Any) -> list[bytes | memoryview]:
    """A state file's parts, in order (the format in the module docstring)."""
    body = memoryview(state).cast("B")
    header = json.dumps({"version": VERSION, "fingerprint": fingerprint_, "tokens": len(tokens),
                         "state_bytes": body.nbytes, "crc32": zlib.crc32(body)}).encode()
    return [MAGIC, struct.pack("<I", len(header)), header, struct.pack(f"<{len(tokens)}i", *tokens), body]


def read_header(f: Any, size: int) -> tuple[dict[str, Any], list[int], int]:
    """The header and tokens of an open state file of `size` bytes, and where its state starts.
    Raises CorruptFile when they do not add up to the file's size."""
    head = f.read(len(MAGIC) + 4)
    if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
        raise CorruptFile("not a state file")
    (length,) = struct.unpack("<I", head[len(MAGIC):])
    if length > min(size, 1 << 16):
        raise CorruptFile("header length out of range")
    try:
        header = json.loads(f.read(length))
        n, m = int(header["tokens"]), int(header["state_bytes"])
        header["fingerprint"], header["crc32"] = str(header["fingerprint"]), int(header["crc32"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFile(f"bad header: {exc}") from None
    start = len(head) + length + 4 * n
    if header.get("version") != VERSION or n <= 0 or m <= 0 or start + m != size:
        raise CorruptFile(f"a header for {start + m} bytes in a file of {size}")
    raw = f.read(4 * n)
    if len(raw) != 4 * n:
        raise CorruptFile("short tokens")
    return header, list(struct.unpack(f"<{n}i", raw)), start


@dataclass
class DiskEntry:
    name: str
    fingerprint: str
    tokens: list[int]
    size: int
    used: float  # wall-clock time of its last write or load (the file's modification time when indexed)


class DiskKvStore:
    """Parked KV state in files under `directory` within `budget_bytes` (see the module docstring).
    `save` only queues a state for the writer thread; `best` and `load` are the decode thread's."""

    def __init__(self, directory: Path, budget_bytes: int, fingerprint_: str) -> None:
        self.directory = Path(directory)
        self.budget = budget_bytes
        self.fingerprint = fingerprint_
        self.stats: collections.Counter[str] = collections.Counter()  # written, loaded, corrupt, dropped
        self._lock = threading.Lock()  # guards _entries (decode thread and writer)
        self._entries: collections.OrderedDict[str, DiskEntry] = collections.OrderedDict()  # least recent first
        self._queue: queue.Queue[tuple[list[int], Any] | None] = queue.Queue()
        self._room = threading.Condition()  # guards _queued, the bytes of the states in _queue
        self._queued = 0
        self._temp = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rescan()
        self._writer = threading.Thread(target=self._write_loop, name="kv-writer", daemon=True)
        self._writer.start()

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    # --- the decode thread's side ---------------------------------------------------------------
    def save(self, tokens: list[int], state: Any, wait: float = 0.0) -> bool:
        """Queues a state for the writer, waiting at most `wait` seconds for room in the queue
        (False: the writer is behind and the state is not saved)."""
        size = memoryview(state).nbytes
        deadline = time.monotonic() + wait
        with self._room:
            while self._queued and self._queued + size > WRITE_QUEUE_BYTES:
                left = deadline - time.monotonic()
                if left <= 0 or not self._room.wait(left):
                    self.stats["dropped"] += 1
                    return False
            self._queued += size
        self._queue.put((list(tokens), state))
        return True

    def best(self, prompt: list[int], longer_than: int = 0) -> tuple[DiskEntry | None, int]:
        """The loadable entry sharing the longest prefix with `prompt`, if longer than `longer_than`
        tokens (what the caller has already), and that length."""
        best, best_k = None, longer_than
        with self._lock:
            entries = [e for e in self._entries.values() if e.fingerprint == self.fingerprint]
        for entry in entries:
            # One comparison in C rules out most entries (those that share only a system prompt).
            if entry.tokens[:best_k + 1] != prompt[:best_k + 1]:
                continue
            k = common_prefix(entry.tokens, prompt)
            if k > best_k:
                best, best_k = entry, k
        return (best, best_k) if best is not None else (None, 0)

    def load(self, entry: DiskEntry) -> Any | None:
        """The entry's state as a ctypes byte array, or None when its file is gone or corrupt (then
        deleted). The file is mapped, not read: llama.cpp copies the state from the page cache
        (a copy-on-write mapping; the writer replaces files by renaming, never rewrites one)."""
        path = self.directory / entry.name
        began = time.monotonic()
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header, tokens, start = read_header(f, size)
                mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            with memoryview(mapped) as view:
                crc = zlib.crc32(view[start:])
            if header["fingerprint"] != self.fingerprint or tokens != entry.tokens or crc != header["crc32"]:
                mapped.close()
                raise CorruptFile("checksum mismatch" if tokens == entry.tokens else "changed since it was indexed")
        except FileNotFoundError:
            self._forget(entry.name)
            return None
        except (CorruptFile, OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            self._discard(entry.name, exc)
            return None
        with self._lock:
            entry.used = time.time()
            if entry.name in self._entries:
                self._entries.move_to_end(entry.name)
        try:
            os.utime(path)  # least recently used is by modification time, also for other replicas
        except OSError:
            pass
        self.stats["loaded"] += 1
        log.info("read a conversation's KV state from disk", extra={"fields": {
            "tokens": len(tokens), "bytes": size - start, "ms": round((time.monotonic() - began) * 1000, 1)}})
        return (ctypes.c_uint8 * (size - start)).from_buffer(mapped, start)

    def close(self, timeout: float | None = None) -> None:
        """Writes what is queued (waiting at most `timeout` seconds), then stops the writer."""
        self._queue.put(None)
        self._writer.join(timeout)

    # --- the writer thread --------------------------------------------------------------------
    def _write_loop(self) -> None:
        try:  # Linux: this thread only; decoding threads come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        next_scan = time.monotonic() + RESCAN_SECONDS
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_scan - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    self._write(*item)
                if time.monotonic() >= next_scan:
                    self.rescan()
                    next_scan = time.monotonic() + RESCAN_SECONDS
            except Exception:  # noqa: BLE001 - a full or broken disk costs the saved state, not the engine
                log.exception("could not save a conversation's KV state", extra={"fields": {"dir": str(self.directory)}})
            finally:
                if item:
                    with self._room:
                        self._queued -= memoryview(item[1]).nbytes
                        self._room.notify_all()

    def _write(self, tokens: list[int], state: Any) -> None:
        name = hashlib.sha256(self.fingerprint.encode() + struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:32]
        name += SUFFIX
        parts = encode(self.fingerprint, tokens, state)
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        if size > self.budget:
            return
        self._temp += 1
        temp = self.directory / f"{name}.tmp-{os.getpid()}-{self._temp}"
        try:
            with open(temp, "wb") as f:
                for part in parts:
                    f.write(part)
            os.replace(temp, self.directory / name)  # atomic: the name holds a whole file or nothing
        finally:
            temp.unlink(missing_ok=True)
        self.stats["written"] += 1
        with self._lock:
            self._entries.pop(name, None)
            self._entries[name] = DiskEntry(name, self.fingerprint, tokens, size, time.time())
            # A state whose tokens this one extends can never match a prompt better: it goes.
            gone = [e.name for e in self._entries.values() if e.fingerprint == self.fingerprint
                    and len(e.tokens) < len(tokens) and tokens[:len(e.tokens)] == e.tokens]
            for old in gone:
                del self._entries[old]
            total = sum(e.size for e in self._entries.values())
            while total > self.budget and len(self._entries) > 1:  # never the one just written
                old, entry = self._entries.popitem(last=False)
                total -= entry.size
                gone.append(old)
        for old in gone:
            (self.directory / old).unlink(missing_ok=True)

    def rescan(self) -> None:
        """Indexes the directory: new files by their headers (corrupt ones deleted), vanished ones
        forgotten, stale temporary files removed."""
        found: dict[str, tuple[float, int]] = {}
        now = time.time()
        for item in os.scandir(self.directory):
            try:
                stat = item.stat()
            except FileNotFoundError:
                continue
            if item.name.endswith(SUFFIX):
                found[item.name] = (stat.st_mtime, stat.st_size)
            elif ".kv.tmp-" in item.name and now - stat.st_mtime > STALE_TEMP_SECONDS:
                Path(item.path).unlink(missing_ok=True)
        with self._lock:
            known = set(self._entries)
        new: list[DiskEntry] = []
        for name in sorted(set(found) - known):
            try:
                with open(self.directory / name, "rb") as f:
                    header, tokens, _ = read_header(f, os.fstat(f.fileno()).st_size)
            except FileNotFoundError:
                continue
            except (CorruptFile, OSError) as exc:
                self._discard(name, exc)
                continue
            new.append(DiskEntry(name, header["fingerprint"], tokens, found[name][1], found[name][0]))
        with self._lock:
            entries = [e for e in self._entries.values() if e.name in found] + new
            self._entries = collections.OrderedDict((e.name, e) for e in sorted(entries, key=lambda e: e.used))

    def _forget(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def _discard(self, name: str, why: Exception) -> None:
        self._forget(name)
        self.stats["corrupt"] += 1
        log.warning("deleted an unreadable KV state file", extra={"fields": {"file": name, "error": str(why)}})
        (self.directory / name).unlink(missing_ok=True)
