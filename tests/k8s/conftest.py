"""Renders the Kubernetes overlays once per test session, the way a platform engineer would: the
gateway's Envoy config and descriptor set are generated from this repo (what `make k8s-config`
does), then `kubectl kustomize` builds each overlay. Everything happens in a copy of k8s/ under a
temporary folder, so the checkout is left as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu", "dev", "kind", "vllm")
SCALED_OUT = ("cpu", "gpu", "kind", "vllm")  # auth and session on PostgreSQL, several replicas each
DESCRIPTOR = ROOT / "build" / "parley.pb"


@dataclass
class Render:
    overlay: str
    path: Path
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        matches = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.overlay}: expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl (1.27+, with its built-in kustomize) is needed to render k8s/overlays")
    return found


def write_gateway_config(tree: Path) -> None:
    """What `make k8s-config` does, into `tree` instead of k8s/."""
    if not DESCRIPTOR.exists():  # a clean clone: generate it as `make gen` would
        subprocess.run([sys.executable, str(ROOT / "tools" / "gen.py")], cwd=ROOT, check=True, capture_output=True)
    generated = tree / "base" / "gateway" / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DESCRIPTOR, generated / "parley.pb")
    shutil.copyfile(DESCRIPTOR.with_name("openapi.json"), generated / "openapi.json")
    shutil.copytree(ROOT / "web", generated / "web")
    script = 'set -a; . k8s/base/gateway/envoy.env; set +a; exec "$0" -m services.gateway.envoy_config --out "$1"'
    subprocess.run(["bash", "-c", script, sys.executable, str(generated / "envoy.yaml")], cwd=ROOT, check=True,
                   capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("generated"))
    write_gateway_config(tree)
    return tree


@pytest.fixture(scope="session")
def renders(k8s_tree: Path) -> dict[str, Render]:
    out_dir = k8s_tree.parent / "rendered"
    out_dir.mkdir()
    renders = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl(), "kustomize", str(k8s_tree / "overlays" / overlay)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}"
        path = out_dir / f"{overlay}.yaml"
        path.write_text(result.stdout)
        renders[overlay] = Render(overlay, path, [d for d in yaml.safe_load_all(result.stdout) if d])
    return renders
