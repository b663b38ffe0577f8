"""Builds and installs llama-cpp-python with Parley's patches to the llama.cpp it vendors.

The sdist from PyPI (the same file `make llama-server` builds the benchmark's peer from, unpatched)
is unpacked, each `patches/llama.cpp/*.patch` is applied in order with `patch -p1`, and the wheel is
built once per version and set of patches into `<peer dir>/wheels/<their hash>/`, then installed over
whatever llama-cpp-python the environment has. The version is the one `requirements/base.txt` pins,
so installing the requirements afterwards keeps this build.

    python tools/patched_llama_cpp.py --peer-dir ~/.cache/parley-peer
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches" / "llama.cpp"
VERSION = re.search(r"^llama-cpp-python==(\S+)$", (ROOT / "requirements" / "base.txt").read_text(), re.MULTILINE)[1]
SDIST = f"llama_cpp_python-{VERSION}"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def wheel(peer_dir: Path) -> Path:
    """The patched wheel, built unless this set of patches was built before."""
    patches = sorted(PATCHES.glob("*.patch"))
    digest = hashlib.sha256(VERSION.encode() + b"".join(p.read_bytes() for p in patches)).hexdigest()[:16]
    out = peer_dir / "wheels" / digest
    built = sorted(out.glob("llama_cpp_python-*.whl"))
    if built:
        return built[-1]
    sdist = peer_dir / f"{SDIST}.tar.gz"
    if not sdist.exists():
        pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(peer_dir), f"llama-cpp-python=={VERSION}")
    with tempfile.TemporaryDirectory(dir=peer_dir) as work:
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="tar")
        source = Path(work) / SDIST
        for patch in patches:
            print(f"applying {patch.name}", flush=True)
            subprocess.run(["patch", "-p1", "--batch", "--forward", "--quiet", "-i", str(patch)], cwd=source, check=True)
        out.mkdir(parents=True, exist_ok=True)
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source))
    return sorted(out.glob("llama_cpp_python-*.whl"))[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-dir", type=Path, required=True, help="where the sdist and the built wheels are kept")
    args = parser.parse_args()
    args.peer_dir.mkdir(parents=True, exist_ok=True)
    built = wheel(args.peer_dir.resolve())
    pip("install", "--quiet", "--force-reinstall", "--no-deps", str(built))
    print(f"installed {built.name} with {len(list(PATCHES.glob('*.patch')))} patch(es) from {PATCHES}", flush=True)


if __name__ == "__main__":
    main()
