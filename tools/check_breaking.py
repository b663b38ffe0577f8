"""`buf breaking` against the previous commit's protos, skipped when there is none.

Both sides are compiled by protoc (with the googleapis protos from the installed package) into
descriptor sets, so buf needs no network and no module resolution for the old side.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gen  # noqa: E402


def git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True)


def descriptor_set(protos: Path, out: Path) -> None:
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    gen.PROTOS = protos
    gen.run_protoc([f"--descriptor_set_out={out}", "--include_imports", "--include_source_info", *files])


def main() -> int:
    if git("rev-parse", "--verify", "-q", "HEAD~1").returncode != 0 or git("cat-file", "-e", "HEAD~1:protos").returncode != 0:
        print("check_breaking: no previous commit with protos; skipped")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = git("archive", "HEAD~1", "protos")
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        descriptor_set(old / "protos", Path(tmp) / "old.binpb")
        descriptor_set(ROOT / "protos", Path(tmp) / "new.binpb")
        config = '{"version":"v2","breaking":{"use":["FILE"]}}'
        result = subprocess.run(
            [str(ROOT / "node_modules/.bin/buf"), "breaking", str(Path(tmp) / "new.binpb"),
             "--against", str(Path(tmp) / "old.binpb"), "--config", config, "--exclude-imports"],
            cwd=ROOT,
        )
        print("check_breaking: " + ("no breaking changes" if result.returncode == 0 else "BREAKING CHANGES (above)"))
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
