"""Where a weights file is (resolve_source) and what it says about itself without loading it: GGUF
metadata and safetensors tensor sizes. The engines' memory estimates read these before a model
loads (to make room for it) and after (to report what it holds), so both are the same number."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from services.inference.engines.base import EngineError

GGUF_MAGIC = b"GGUF"
# GGUF value types: (struct format, size) for fixed-size ones; 8 is a string, 9 an array.
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _FIXED:
        return _read(f, _FIXED[kind])
    if kind == _STRING:
        if keep:
            return _string(f)
        f.seek(_read(f, "<Q"), 1)
        return None
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _FIXED:  # skipped whole: arrays hold the tokenizer's vocabulary
            f.seek(struct.calcsize(_FIXED[item]) * count, 1)
        else:
            for _ in range(count):
                _value(f, item, keep=False)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays are skipped). Empty when the file is not
    GGUF or cannot be read. Read once per version of the file (~0.3 s for the bundled model: the
    tokenizer's arrays are walked): a load estimates memory before and after."""
    try:
        stat = os.stat(path)
    except OSError:
        return {}
    return dict(_gguf_metadata(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _gguf_metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return {}
            _read(f, "<I")  # version
            _read(f, "<Q")  # tensor count
            found: dict[str, Any] = {}
            for _ in range(_read(f, "<Q")):
                key = _string(f)
                value = _value(f, _read(f, "<I"), keep=not key.startswith("tokenizer."))
                if value is not None:
                    found[key] = value
            return found
    except (OSError, ValueError, struct.error):
        return {}


def safetensors_parameters(folder: str | Path) -> int:
    """The number of parameters in a folder's *.safetensors files (from their headers); 0 when none."""
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            continue
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor.get("shape", []):
                    count *= dim
                total += count
    return total


def resolve_source(source: str, model_id: str = "") -> str:
    """A local source's path: "package:<module>/<file>" inside an installed package, else a path."""
    if source.startswith("package:"):
        module, _, name = source[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise EngineError(f"package {module!r} is not installed" + (f" (it ships {model_id})" if model_id else ""))
        return str(Path(list(spec.submodule_search_locations)[0]) / name)
    return os.path.expanduser(source)
