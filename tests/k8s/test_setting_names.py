"""Every PARLEY_* variable that k8s/ sets or names is a setting the service it reaches actually reads
(and every one README.md and docs/ name is a setting, or a variable the benchmarks read), so a
renamed or misspelt setting cannot drift silently (a variable nobody reads is ignored at start-up,
and the pod runs with the default instead).

Known names come from the settings dataclasses themselves (fields made with
services.core.config.setting, named by config.env_name): the ones under services/core/ are read by
every service, the ones under services/<name>/ by that service only."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

from tests.k8s.conftest import K8S, ROOT, Render
from tests.k8s.test_dockerfiles import SHARED, PURE_PYTHON, parse
from tests.k8s.test_manifests import containers, env_of

from services.core.config import env_name

NAME = re.compile(r"\bPARLEY_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
SHARED_PACKAGE = "core"
# Names a manifest may set before the settings class that reads them is committed.
PENDING: dict[str, set[str]] = {}


def settings_modules() -> list[str]:
    """Modules under services/ that declare settings (a `setting(` call), found by reading the
    source, so that a new settings class anywhere counts without being listed here."""
    found = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if "__pycache__" not in path.parts and re.search(r"=\s*setting\(", path.read_text()):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def known_settings() -> dict[str, set[str]]:
    """Environment names by the package (core, auth, session…) that declares them."""
    known: dict[str, set[str]] = {}
    for module_name in settings_modules():
        module = importlib.import_module(module_name)
        package = module_name.split(".")[1]
        for value in vars(module).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module_name:
                names = {env_name(f.name) for f in dataclasses.fields(value) if "secret" in f.metadata}
                known.setdefault(package, set()).update(names)
    return known


KNOWN = known_settings()


def read_by(service: str) -> set[str]:
    if not (ROOT / "services" / service).is_dir():  # redis: not a Parley service, reads none
        return set()
    return KNOWN.get(SHARED_PACKAGE, set()) | KNOWN.get(service, set()) | PENDING.get(service, set())


def test_the_settings_classes_are_found() -> None:
    assert {"core", "auth", "inference", "gateway"} <= set(KNOWN)
    assert {"PARLEY_HOST", "PARLEY_JWT_ISSUER", "PARLEY_SIGNING_KEYS_DIR", "PARLEY_THREADS",
            "PARLEY_INFERENCE_LB"} <= set().union(*KNOWN.values())


def test_every_parley_variable_a_pod_gets_is_read_by_its_service(renders: dict[str, Render]) -> None:
    problems = []
    for render in renders.values():
        for workload in render.workloads():
            service = workload["metadata"]["name"]
            for container in containers(workload):
                for name in env_of(container, render):
                    if name.startswith("PARLEY_") and name not in read_by(service):
                        problems.append(f"{render.overlay}: {service}/{container['name']} sets {name}")
    assert not problems, "variables no settings class of that service reads:\n" + "\n".join(sorted(set(problems)))


def test_the_gateway_config_settings_are_read_by_its_generator() -> None:
    names = NAME.findall((K8S / "base" / "gateway" / "envoy.env").read_text())
    assert names and set(names) <= read_by("gateway"), set(names) - read_by("gateway")


def test_image_defaults_are_settings_of_the_service_they_start() -> None:
    images: dict[Path, tuple[str, ...]] = {SHARED: PURE_PYTHON}
    images.update({path: ("inference",) for path in (ROOT / "services" / "inference").glob("Dockerfile*")})
    for path, services in images.items():
        env = " ".join(parse(path).stages[-1].args_of("ENV"))
        for name in NAME.findall(env):
            for service in services:
                assert name in read_by(service), f"{path.relative_to(ROOT)}: ENV {name} is not read by {service}"


def test_every_parley_variable_the_k8s_files_name_exists() -> None:
    """Docs and comments too: a platform engineer copies names from them into an overlay."""
    every = set().union(*KNOWN.values(), *PENDING.values())
    problems = []
    for path in sorted(K8S.rglob("*")):
        if path.is_file() and "generated" not in path.parts and path.suffix in (".md", ".yaml", ".env"):
            problems += [f"{path.relative_to(ROOT)}: {n}" for n in NAME.findall(path.read_text()) if n not in every]
    assert not problems, "unknown settings named:\n" + "\n".join(problems)


def read_by_tools() -> set[str]:
    """Variables the benchmarks and tests read themselves (os.environ), not settings of a service."""
    names = set()
    for path in [*(ROOT / "bench").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        names.update(re.findall(r"environ(?:\.get)?[\(\[]\s*\"(PARLEY_\w+)\"", path.read_text()))
    return names


def test_every_parley_variable_the_docs_name_exists() -> None:
    """README.md and docs/: where a newcomer copies a setting's name from."""
    every = set().union(*KNOWN.values(), *PENDING.values(), read_by_tools())
    problems = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        problems += [f"{path.relative_to(ROOT)}: {n}" for n in NAME.findall(path.read_text()) if n not in every]
    assert not problems, "unknown settings named:\n" + "\n".join(problems)


def test_auth_reads_its_signing_keys_where_the_secret_is_mounted(renders: dict[str, Render]) -> None:
    for render in renders.values():
        pod: dict[str, Any] = render.get("Deployment", "auth")["spec"]["template"]["spec"]
        (auth,) = containers(render.get("Deployment", "auth"))
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "parley-signing-keys"]
        (mount,) = [m for m in auth["volumeMounts"] if m["name"] == volume["name"]]
        assert mount.get("readOnly") is True and "subPath" not in mount  # subPath would never see a rotation
        assert env_of(auth, render)["PARLEY_SIGNING_KEYS_DIR"] == mount["mountPath"]

