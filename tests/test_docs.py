"""The documentation runs: every ```python block of README.md and docs/*.md, and the MkDocs site.

Blocks of one file run in order in one namespace (a page builds its example model once and later
blocks use it), in a fresh temporary working directory, on the tiny models the pages create.

A block can be left out only by an explicit marker on the line right before its opening fence:

    <!-- no-run: why this block cannot run in the test suite -->

The reason is mandatory, and :data:`ALLOWED_EXCLUSIONS` must list the block too, so an exclusion is
never silent. Today no block is excluded.
"""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

#: (file relative to the repository root, first line of the block) → why it may not run. Empty:
#: every Python block of the docs runs.
ALLOWED_EXCLUSIONS: dict = {}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")
_PYTHON = {"python", "py", "python3"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    language: str
    excluded: Optional[str] = None  # the no-run reason, "" if the marker has none

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> List[Block]:
    """Every fenced code block of a Markdown file, with its language and no-run marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], match["indent"]
        language = (match["info"].split() or [""])[0].strip("{}.").lower()
        previous = lines[i - 1] if i > 0 else ""
        marker = _NO_RUN.match(previous)
        start, i = i + 1, i + 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence)) and set(lines[i].strip()) == {fence[0]}
        ):
            i += 1
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[start:i]]
        excluded = (marker["reason"] or "") if marker else None
        blocks.append(Block(path, start + 1, "\n".join(body) + "\n", language, excluded))
        i += 1
    return blocks


def python_blocks(path: Path) -> List[Block]:
    return [b for b in code_blocks(path) if b.language in _PYTHON]


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------- the collector itself
def test_collector_finds_fences_languages_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n```bash\necho no\n```\n\n"
        "<!-- no-run: needs a GPU -->\n```python\nraise SystemExit\n```\n\n"
        "- item\n\n    ```python\n    y = x + 1\n    ```\n\n````python\nz = '```'\n````\n",
        encoding="utf-8",
    )
    blocks = code_blocks(page)
    assert [b.language for b in blocks] == ["python", "bash", "python", "python", "python"]
    assert [b.excluded for b in blocks] == [None, None, "needs a GPU", None, None]
    assert blocks[0].code == "x = 1\n" and blocks[0].line == 4
    assert blocks[3].code == "y = x + 1\n"
    assert blocks[4].code == "z = '```'\n"


def test_every_page_is_collected_and_has_code():
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "index.md", "guide.md", "methods.md", "report.md"} <= names
    for name in ("README.md", "index.md", "guide.md", "methods.md", "report.md"):
        path = next(p for p in DOC_FILES if p.name == name)
        assert python_blocks(path), f"{name} should have runnable Python examples"


def test_exclusions_are_explicit_and_justified():
    """A no-run marker needs a reason and an entry in ALLOWED_EXCLUSIONS (and vice versa)."""
    found = {}
    for path in DOC_FILES:
        for block in python_blocks(path):
            if block.excluded is not None:
                assert block.excluded.strip(), f"{block.where}: write the reason, <!-- no-run: why -->"
                found[(_doc_id(path), block.line)] = block.excluded
    assert set(found) == set(ALLOWED_EXCLUSIONS), (
        f"no-run blocks {sorted(found)} must match ALLOWED_EXCLUSIONS {sorted(ALLOWED_EXCLUSIONS)}"
    )


# ----------------------------------------------------------------------------- running the examples
RUNNABLE_FILES = [p for p in DOC_FILES if any(b.excluded is None for b in python_blocks(p))]


@pytest.mark.parametrize("path", RUNNABLE_FILES, ids=_doc_id)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = [b for b in python_blocks(path) if b.excluded is None]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": f"docs::{_doc_id(path)}"}
    for block in blocks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the pages show warnings on purpose (e.g. linear LoRA)
                exec(compile(block.code, block.where, "exec"), namespace)
        except Exception as error:  # name the block, keep the traceback
            raise AssertionError(f"the Python block at {block.where} failed: {type(error).__name__}: {error}") from error


# ----------------------------------------------------------------------------- the site
def test_mkdocs_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if not _importable(module):
            pytest.fail(f"{module} is not installed: pip install -e \".[test]\" installs the docs toolchain")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").exists()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
