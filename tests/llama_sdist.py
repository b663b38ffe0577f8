"""Real models' chat templates and llama.cpp's expected parses, as test data: read from the
llama-cpp-python sdist that `make llama-server` downloads into the peer cache (PARLEY_PEER_DIR,
default ~/.cache/parley-peer). Missing: a skip, unless make test asks for it
($PARLEY_REQUIRE_LLAMA_SERVER: the Makefile fetches the sdist first)."""

from __future__ import annotations

import functools
import os
import tarfile
from pathlib import Path

import pytest

from tests.llama_server import CACHE
from tools.patched_llama_cpp import SDIST  # the version pinned in requirements/base.txt

TEMPLATES = f"{SDIST}/vendor/llama.cpp/models/templates/"


@functools.lru_cache(maxsize=1)
def _members() -> dict[str, bytes]:
    path = Path(os.environ.get("PARLEY_LLAMA_SDIST") or CACHE / f"{SDIST}.tar.gz")
    if not path.is_file():
        message = f"no llama-cpp-python sdist at {path}: fetch it with `make llama-server`"
        if os.environ.get("PARLEY_REQUIRE_LLAMA_SERVER"):
            pytest.fail(message)
        pytest.skip(message)
    out = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and (member.name.startswith(TEMPLATES) or member.name.endswith("tests/test-chat.cpp")
                                    or member.name.endswith("gguf_new_metadata.py")):
                handle = tar.extractfile(member)
                assert handle is not None
                out[member.name] = handle.read()
    return out


def template_names() -> list[str]:
    """The file names of every template in llama.cpp's collection (e.g. "Qwen-Qwen3-0.6B.jinja")."""
    return sorted(name[len(TEMPLATES):] for name in _members() if name.endswith(".jinja"))


def template(name: str) -> str:
    """One template's text, by file name."""
    return _members()[TEMPLATES + name].decode("utf-8")
