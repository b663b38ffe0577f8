"""The docs a newcomer reads stay true to the repository: a short README, links that lead somewhere,
and no pointer to a file or module the repository does not have (a design note kept outside it, a
module since renamed). Reads files only: no stack, no imports of the services."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".ini", ".txt", ".sh", ".proto", ".env",
                 ".js", ".html", ".css", ".json", ".cfg"}
TEXT_NAMES = {"Makefile", "run"}  # .ci/run
# Spelt in pieces so that this file does not name them itself.
OUTSIDE_REFERENCES = ("DESIGN" + ".md", "../" + "shared")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
# A path in backticks, unless it is another project's (llama.cpp's `tests/test-chat.cpp`).
CODE_PATH = re.compile(r"(?<!'s )`((?:services|tests|bench|tools|k8s|web|protos|docs)/[\w./-]+)`")
MODULE = re.compile(r"\bservices(?:\.\w+)+")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "k8s" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def text_files() -> list[Path]:
    """The repository's own text files: what git tracks or would (not ignored virtualenvs, generated
    code or the tests' output, whatever their names)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()
            and (Path(name).suffix in TEXT_SUFFIXES or Path(name).name in TEXT_NAMES
                 or Path(name).name.startswith("Dockerfile"))]


def prose(markdown: str) -> str:
    """The text outside fenced code blocks (shell comments there are not headings or links)."""
    return FENCE.sub("", markdown)


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(m) for m in re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), re.MULTILINE)}


def test_the_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


def test_the_readme_keeps_the_two_commands_and_links_every_page_of_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## The two commands" in readme and "make test" in readme and "make run" in readme
    linked = {target.split("#")[0] for target in LINK.findall(readme)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_relative_links_lead_to_files_and_headings_that_exist() -> None:
    broken = []
    for page in markdown_files():
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{where}: no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_paths_the_docs_name_exist() -> None:
    missing = []
    for page in markdown_files():
        for path in CODE_PATH.findall(page.read_text()):
            if not (ROOT / path.rstrip(".")).exists() and "generated" not in path:
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "paths named in the docs that the repository does not have:\n" + "\n".join(missing)


def test_nothing_points_outside_the_repository() -> None:
    found = []
    for path in text_files():
        text = path.read_text(errors="replace")
        found += [f"{path.relative_to(ROOT)}: {name}" for name in OUTSIDE_REFERENCES if name in text]
    assert not found, "references to files the repository does not have:\n" + "\n".join(found)


def defines(module: Path, name: str) -> bool:
    """Whether a module defines or imports `name` at its top level (read, not imported)."""
    definition = rf"^(?:async def|def|class)\s+{name}\b|^{name}\s*[:=]"
    imported = rf"^from \S+ import (?:\([^)]*|[^\n]*)\b{name}\b"
    return re.search(f"{definition}|{imported}", module.read_text(), re.MULTILINE) is not None


def unresolved(dotted: str) -> bool:
    """Whether a dotted name under services names no module, package or top-level name of one."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:end])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            return end < len(parts) and not defines(module, parts[end])
    return True


def test_modules_named_in_code_and_docs_exist() -> None:
    pages = [p for p in text_files() if p.suffix in (".py", ".md")]
    missing = sorted({f"{p.relative_to(ROOT)}: {name}" for p in pages
                      for name in MODULE.findall(p.read_text()) if unresolved(name)})
    assert not missing, "modules that do not exist:\n" + "\n".join(missing)
