"""The documentation runs: every ```python block of README.md and docs/*.md, and the MkDocs site.

The blocks are found and run by Sybil (a maintained documentation tester; its Markdown parser
and Python evaluator, driven from here so that plain ``python -m pytest`` runs them). Blocks of
one file run in order in one namespace (a page builds its example model once and later blocks use
it), in a fresh temporary working directory with ``HF_HUB_OFFLINE=1``, on the tiny models the
pages create. A failure names the file and the line of the failing statement.

A block can be left out only by Sybil's skip directive, an HTML comment (invisible on the site) on
the line right before its opening fence, with a quoted reason:

    <!-- skip: next "why this block cannot run in the test suite" -->

The reason is mandatory, and :data:`ALLOWED_EXCLUSIONS` must list the directive too, so an
exclusion is never silent. Today no block is excluded.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import traceback
import unittest
import warnings
from pathlib import Path
from typing import List

import pytest

try:
    from sybil import Document, Example, Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
    from sybil.parsers.markdown.lexers import FencedCodeBlockLexer
except ImportError as error:  # a clear message instead of a bare collection error
    raise ImportError(f"{error}: pip install -e \".[test]\" installs sybil, which runs the docs' examples") from error

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

#: (file relative to the repository root, line of the skip directive) → why the next block may not
#: run. Empty: every Python block of the docs runs.
ALLOWED_EXCLUSIONS: dict = {}

#: ```python blocks (Sybil runs exactly this info string) and skip directives
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])
SKIPS = Sybil(parsers=[SkipParser()])
#: info strings that MkDocs highlights as Python but Sybil would not run
_PYTHON_LIKE = re.compile(r"^\{?\.?(python3?|py|pycon)\b", re.IGNORECASE)


def _doc_id(path: Path) -> str:
    """The page's path relative to the repository root (its name, for a page elsewhere)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def python_examples(path: Path) -> List[Example]:
    """The ```python blocks of a page (and its skip directives), in order, sharing one namespace."""
    return list(SYBIL.parse(path).examples())


def _is_skip(example: Example) -> bool:
    return isinstance(example.parsed, tuple)  # a skip directive parses to (action, reason)


def run_page(path: Path) -> Document:
    """Run every Python block of ``path`` in order in one namespace; an excluded block is skipped.
    Raises AssertionError naming the block (its fence's line) with the original error chained,
    whose traceback has the line of the page that failed."""
    document = SYBIL.parse(path)
    document.namespace["__name__"] = f"docs::{_doc_id(path)}"
    for example in document.examples():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the pages show warnings on purpose (e.g. linear LoRA)
                example.evaluate()
        except unittest.SkipTest:
            continue  # a block after a skip directive; test_exclusions_are_explicit_and_justified checks it
        except Exception as error:  # name the block, keep the traceback
            raise AssertionError(
                f"the Python block at {_doc_id(path)}:{example.line} failed: {type(error).__name__}: {error}"
            ) from error
    return document


# ----------------------------------------------------------------------------- the Sybil set-up itself
def test_runner_shares_namespace_skips_and_names_the_failing_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n```bash\nexit 1\n```\n\n"
        '<!-- skip: next "needs a GPU" -->\n```python\nraise SystemExit\n```\n\n'
        "- item\n\n    ```python\n    y = x + 1\n    ```\n\n````python\nz = '```'\n````\n\n"
        "```python\nassert (x, y, z) == (1, 2, '```')\nw = 1 / 0\n```\n",
        encoding="utf-8",
    )
    examples = python_examples(page)
    assert [e.line for e in examples] == [3, 11, 12, 18, 22, 26]
    assert [_is_skip(e) for e in examples] == [False, True, False, False, False, False]
    with pytest.raises(AssertionError, match=r"the Python block at page\.md:26 failed: ZeroDivisionError") as info:
        run_page(page)
    frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(info.value.__cause__.__traceback__)]
    assert (str(page), 28) in frames  # the traceback points at the page's own line


def test_every_page_is_collected_and_has_code():
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "index.md", "guide.md", "methods.md", "report.md"} <= names
    for name in ("README.md", "index.md", "guide.md", "methods.md", "report.md"):
        path = next(p for p in DOC_FILES if p.name == name)
        assert any(not _is_skip(e) for e in python_examples(path)), f"{name} should have runnable Python examples"


def test_python_blocks_use_the_info_string_python():
    """Sybil runs blocks whose info string is exactly ``python``; a ```py or ```python title=…
    block would be highlighted on the site but never run."""
    lexer = FencedCodeBlockLexer(language=r".*")
    for path in DOC_FILES:
        document = Document(path.read_text(encoding="utf-8"), str(path))
        for region in lexer(document):
            info = region.lexemes["language"].strip()
            line = document.text.count("\n", 0, region.start) + 1
            assert info == "python" or not _PYTHON_LIKE.match(info), (
                f"{_doc_id(path)}:{line}: write the fence as ```python (not ```{info}) so the test suite runs it"
            )


def test_exclusions_are_explicit_and_justified():
    """A skip directive is `skip: next` with a quoted reason and an entry in ALLOWED_EXCLUSIONS (and
    vice versa)."""
    found = {}
    for path in DOC_FILES:
        for directive in SKIPS.parse(path).examples():
            action, reason = directive.parsed
            where = f"{_doc_id(path)}:{directive.line}"
            assert action == "next", f"{where}: exclude single blocks, <!-- skip: next \"why\" -->"
            try:
                text = ast.literal_eval(reason or "")
            except (SyntaxError, ValueError):
                text = None
            assert isinstance(text, str) and text.strip(), f"{where}: write the reason, <!-- skip: next \"why\" -->"
            found[(_doc_id(path), directive.line)] = text
    assert set(found) == set(ALLOWED_EXCLUSIONS), (
        f"skip directives {sorted(found)} must match ALLOWED_EXCLUSIONS {sorted(ALLOWED_EXCLUSIONS)}"
    )


# ----------------------------------------------------------------------------- running the examples
RUNNABLE_FILES = [p for p in DOC_FILES if any(not _is_skip(e) for e in python_examples(p))]


@pytest.mark.parametrize("path", RUNNABLE_FILES, ids=_doc_id)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_page(path)


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
