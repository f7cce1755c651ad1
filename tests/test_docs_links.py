"""The documentation can be checked from a clone: every relative link in ``README.md``, ``benchmarks/README.md`` and
``docs/**/*.md`` resolves, every results page under ``docs/results/`` names a data file (JSON or CSV) that exists
beside it, the README stays a manual (at most 25 KB), and no text of the repository narrates its own history."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
README_MAX_BYTES = 25_000
DATA_SUFFIXES = (".json", ".csv")

# [text](target) and ![alt](target), target up to the first space or closing parenthesis (an optional "title" after
# a space is not part of the target).
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# History narration in the repository's own text: the word session followed by a number.
_SESSION = re.compile(r"\bsession\s+[0-9]", re.IGNORECASE)
_SKIP_DIRS = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache"}
_TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".sh"}


def markdown_files() -> List[Path]:
    """The documents whose links must resolve: the two READMEs and every Markdown file under ``docs/``."""
    files = [REPO / "README.md", REPO / "benchmarks" / "README.md"]
    files += sorted((REPO / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def _blank(match: "re.Match[str]") -> str:
    """The matched text with every character but newlines replaced by a space (offsets and line numbers kept)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def link_targets(text: str) -> List[Tuple[int, str]]:
    """``(line, target)`` of the links of ``text`` that point into the repository: not inside code (fenced blocks or
    spans), not a URL with a scheme (``https:``, ``mailto:``), not a bare ``#anchor``; the ``#fragment`` is dropped.

    Args:
        text: Markdown source.

    Returns:
        1-based line of each link's start and its target, in order, e.g. ``[(3, "docs/results/README.md")]``.
    """
    text = _CODE_SPAN.sub(_blank, _FENCE.sub(_blank, text))
    targets = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if _SCHEME.match(target) or target.startswith("#"):
            continue
        targets.append((text.count("\n", 0, match.start()) + 1, target.split("#", 1)[0]))
    return targets


def broken_links(doc: Path, root: Path = REPO) -> List[str]:
    """``"file:line: target"`` (file relative to ``root``) for every relative link of ``doc`` whose target does not
    exist."""
    return [
        f"{doc.relative_to(root)}:{line}: {target}"
        for line, target in link_targets(doc.read_text("utf-8"))
        if not (doc.parent / target).exists()
    ]


def results_pages() -> List[Path]:
    """One page per study: ``docs/results/<area>/README.md``."""
    return sorted(RESULTS.glob("*/README.md"))


def data_files_named(page: Path) -> List[Path]:
    """The JSON / CSV files ``page`` links to that exist inside its own folder (beside it or below it)."""
    folder = page.parent.resolve()
    found = []
    for _, target in link_targets(page.read_text("utf-8")):
        path = (page.parent / target).resolve()
        if path.suffix in DATA_SUFFIXES and path.is_file() and folder in path.parents:
            found.append(path)
    return found


def repository_text_files() -> Iterator[Path]:
    """The repository's own text files (sources, docs, configuration), without virtual environments, run outputs or
    build folders."""
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in _TEXT_SUFFIXES or name == "Makefile":
                yield path


def session_mentions() -> List[Tuple[str, int, str]]:
    """``(file, line, text)`` of every line of the repository's text files that names a numbered session."""
    hits = []
    for path in repository_text_files():
        for number, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), start=1):
            if _SESSION.search(line):
                hits.append((str(path.relative_to(REPO)), number, line.strip()[:120]))
    return hits


# ------------------------------------------------------------------------------------------------------ the helpers
def test_link_targets_skip_code_urls_and_anchors() -> None:
    text = (
        "See [the page](docs/results/README.md#scaling), ![figure](a/b.png \"title\"), [site](https://example.org),\n"
        "[mail](mailto:x@example.org), [here](#install) and `[not a link](nowhere.md)`.\n"
        "```bash\n[also not](inside/a/fence.md)\n```\n"
        "[a text that wraps\nonto the next line](wrapped.md)\n"
    )
    assert link_targets(text) == [(1, "docs/results/README.md"), (1, "a/b.png"), (6, "wrapped.md")]


def test_a_broken_link_is_reported_with_file_and_line(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    (tmp_path / "there.csv").write_text("a\n1\n")
    doc.write_text("# Page\n\n[data](there.csv)\n[gone](missing/file.json)\n")
    assert broken_links(doc, root=tmp_path) == ["page.md:4: missing/file.json"]


# ------------------------------------------------------------------------------------------------- the repository
@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert broken_links(doc) == []


def test_results_has_a_page_per_study_folder() -> None:
    folders = sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.is_dir() else []
    assert folders, f"{RESULTS.relative_to(REPO)}: no results folder"
    without_page = [str(f.relative_to(REPO)) for f in folders if not (f / "README.md").is_file()]
    assert without_page == [], f"results folders without a README.md page: {without_page}"


def test_every_results_page_names_a_data_file_beside_it() -> None:
    pages = results_pages()
    assert pages, f"{RESULTS.relative_to(REPO)}: no results page"
    without_data = [str(page.relative_to(REPO)) for page in pages if not data_files_named(page)]
    assert without_data == [], f"results pages that link no JSON / CSV file in their own folder: {without_data}"


def test_readme_is_a_manual_of_at_most_25_kb() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}): move results to docs/"


def test_no_text_names_a_numbered_session() -> None:
    assert session_mentions() == []


def named_tests(text: str) -> List[Tuple[str, str]]:
    """``(file, test)`` for every ``tests/FILE.py::name`` in ``text``, and every ``::name`` that follows one in the
    same table cell (it names another test of that file).

    Example: ``"`tests/a.py::test_x`, `::test_y`"`` gives ``[("tests/a.py", "test_x"), ("tests/a.py", "test_y")]``.
    """
    found = []
    for line in text.splitlines():
        for cell in line.split("|"):
            current = None
            for match in re.finditer(r"(tests/[\w/]+\.py)?::(\w+)", cell):
                current = match.group(1) or current
                if current is not None:
                    found.append((current, match.group(2)))
    return found


def test_named_tests_reads_files_and_continuations() -> None:
    assert named_tests("| a | `tests/a.py::test_x`, `::test_y` |\n| b | `::orphan` |") == [
        ("tests/a.py", "test_x"), ("tests/a.py", "test_y")]


def test_every_guarantee_names_a_test_that_exists() -> None:
    page = REPO / "docs" / "guarantees.md"
    named = named_tests(page.read_text("utf-8"))
    assert len(named) >= 20, named
    missing = [f"{file}::{name}" for file, name in named
               if not (REPO / file).is_file() or f"def {name}(" not in (REPO / file).read_text("utf-8")]
    assert missing == [], f"docs/guarantees.md names tests that do not exist: {missing}"
