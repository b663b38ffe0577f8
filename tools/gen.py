"""Generates everything derived from protos/: Python messages, gRPC stubs, mypy stubs and the
descriptor set Envoy's transcoder reads, and the OpenAPI document made from it (tools/openapi.py).
Output goes under build/ (git-ignored).

    python tools/gen.py            # what `make gen` runs

google/api/*.proto come from the installed googleapis-common-protos package: they are copied to
build/googleapis so that protoc and buf resolve imports the same way.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BUILD = ROOT / "build"
GEN = BUILD / "gen"
GOOGLEAPIS = BUILD / "googleapis"
DESCRIPTOR = BUILD / "parley.pb"
# The REST API's OpenAPI document, beside the descriptor set: the gateway serves it at /v1/openapi.json.
OPENAPI = BUILD / "openapi.json"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"gen: the package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def copy_googleapis() -> None:
    source = _package_dir("google.api")
    target = GOOGLEAPIS / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    for proto in ("annotations.proto", "http.proto", "httpbody.proto"):
        shutil.copyfile(source / proto, target / proto)


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def run_protoc(args: list[str]) -> None:
    well_known = _package_dir("grpc_tools") / "_proto"
    # mypy-protobuf's plugins sit beside this interpreter; the venv need not be on PATH.
    bindir = Path(sys.executable).parent
    plugins = [f"--plugin=protoc-gen-{name}={bindir / f'protoc-gen-{name}'}" for name in ("mypy", "mypy_grpc")]
    argv = ["protoc", f"-I{PROTOS}", f"-I{GOOGLEAPIS}", f"-I{well_known}", *plugins, *args]
    if protoc.main(argv) != 0:
        raise SystemExit("gen: protoc failed (see above)")


def main() -> None:
    copy_googleapis()
    if GEN.exists():
        shutil.rmtree(GEN)
    GEN.mkdir(parents=True)
    files = proto_files()
    run_protoc(
        [
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            f"--mypy_out={GEN}",
            f"--mypy_grpc_out={GEN}",
            *files,
        ]
    )
    run_protoc(["--include_imports", "--include_source_info", f"--descriptor_set_out={DESCRIPTOR}", *files])
    import openapi  # tools/openapi.py; after protoc: it reads the descriptor set written above

    document = openapi.write(DESCRIPTOR, OPENAPI)
    operations = sum(len(item) for item in document["paths"].values())
    print(f"gen: {len(files)} proto files -> {GEN.relative_to(ROOT)}, {DESCRIPTOR.relative_to(ROOT)}, "
          f"{OPENAPI.relative_to(ROOT)} ({operations} operations)")


if __name__ == "__main__":
    sys.exit(main())
