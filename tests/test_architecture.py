"""The package's layers import only what comes before them in the data flow (README, "Architecture").

runtime -> raw logs -> data -> models -> sharding -> collapse -> training -> serving / analysis -> cli; ``runtime``
(the stack check, malloc tuning, locks) is the bottom and imports nothing; ``config`` (the options, torch-free) sits
beside ``data``; ``benchmarks`` and ``torchx_components.py`` sit on top. Every
``import multiembed.X`` / ``from multiembed.X import ...`` of every module, at any depth (function-level imports
too), is checked.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

import pytest

import import_graph

REPO = Path(__file__).resolve().parents[1]

# Layer -> the layers it may import (itself always allowed).
ALLOWED: Dict[str, Set[str]] = {
    "runtime": set(),
    "data": {"runtime"},
    "config": set(),
    "models": {"runtime", "data", "config"},
    "sharding": {"runtime", "data", "config", "models"},
    "collapse": {"runtime", "data", "config", "models", "sharding"},
    "training": {"runtime", "data", "config", "models", "sharding", "collapse"},
    "serving": {"runtime", "data", "config", "models", "sharding", "collapse", "training"},
    "analysis": {"runtime", "data", "config", "models", "sharding", "collapse", "training"},
    "cli": {
        "runtime", "data", "config", "models", "sharding", "collapse", "training", "serving", "analysis", "benchmarks",
    },
    "benchmarks": {"runtime", "data", "config", "models", "sharding", "collapse", "training", "serving", "analysis"},
}


def _package_imports(path: Path) -> Iterator[Tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "multiembed":
                if len(parts) == 1:
                    raise AssertionError(f"{path}:{node.lineno}: imports the bare namespace 'multiembed'")
                yield node.lineno, parts[1]


def _layers() -> Iterator[str]:
    for layer in ALLOWED:
        if (REPO / layer).is_dir():
            yield layer


def test_every_installed_folder_has_a_layer_rule() -> None:
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    installed = {name.split(".")[1] for name in config["tool"]["setuptools"]["packages"]}
    assert installed <= set(ALLOWED), f"no import rule for {sorted(installed - set(ALLOWED))}"


def test_every_subpackage_is_installed() -> None:
    """A regular ``pip install .`` installs only the listed packages: every folder with an ``__init__.py`` is one."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {
        "multiembed." + ".".join(init.parent.relative_to(REPO).parts)
        for layer in _layers()
        for init in (REPO / layer).rglob("__init__.py")
    }
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"


@pytest.mark.parametrize("layer", list(_layers()))
def test_layer_imports_only_what_comes_before_it(layer: str) -> None:
    problems = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for line, imported in _package_imports(path):
            if imported != layer and imported not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(REPO)}:{line} imports multiembed.{imported}")
    assert not problems, "\n".join(problems)


def test_torchx_components_import_only_torch_free_layers() -> None:
    """torchx loads the component file in its own process: it needs the options and the CLI's error helpers, never
    torch or torchrec."""
    imported = {name for _, name in _package_imports(REPO / "torchx_components.py")}
    assert imported <= {"config", "cli"}, imported


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from multiembed.training.trainer import Trainer\n")
    assert list(_package_imports(module)) == [(2, "training")]


def test_serving_reaches_neither_the_converter_nor_the_generator() -> None:
    """``multiembed predict`` encodes raw rows and scores them through ``data.encode`` and ``data.metrics``."""
    graph = import_graph.edges(import_graph.load())
    reached = import_graph.closure(graph, "multiembed.serving.predict")
    assert not {m for m in reached if m.startswith(("multiembed.data.convert", "multiembed.data.synthetic"))}


# The one import cycle left (the planner's refusal prints the report's memory account, the report reads the planner's
# tables); each entry must still be found (so the list only shrinks), and nothing else may appear.
KNOWN_CYCLES = [["multiembed.sharding.planner", "multiembed.sharding.report"]]
KNOWN_PRIVATE_IMPORTS: Dict[str, Set[str]] = {}


def _private_names(found: list) -> Dict[str, Set[str]]:
    names: Dict[str, Set[str]] = {}
    for line in found:
        path, _, imported = line.partition(" imports ")
        names.setdefault(path.split(":")[0], set()).update(n.rsplit(".", 1)[1] for n in imported.split(", "))
    return names


def test_no_import_cycle() -> None:
    """A module never imports, directly or not, a module that imports it (package ``__init__``s included)."""
    found = import_graph.cycles(import_graph.edges(import_graph.load()))
    assert found == KNOWN_CYCLES, f"import cycles: {found}"


def test_no_module_imports_another_modules_private_name() -> None:
    """An underscore name is its module's own: another module that needs it gets a public name."""
    found = _private_names(import_graph.private_imports(import_graph.load()))
    assert found == KNOWN_PRIVATE_IMPORTS, f"private imports: {found}"


def test_the_checks_catch_a_cycle_and_a_private_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in ("data", "models"):
        (tmp_path / layer).mkdir()
    (tmp_path / "data" / "a.py").write_text("from multiembed.data.b import _hidden\n")
    (tmp_path / "data" / "b.py").write_text("def f():\n    import multiembed.data.a\n_hidden = 1\n")
    (tmp_path / "models" / "c.py").write_text("from multiembed.models import d\n")
    (tmp_path / "models" / "d.py").write_text("X = 1\n")
    (tmp_path / "torchx_components.py").write_text("")
    monkeypatch.setattr(import_graph, "REPO", tmp_path)
    modules = import_graph.load()
    assert import_graph.cycles(import_graph.edges(modules)) == [["multiembed.data.a", "multiembed.data.b"]]
    assert import_graph.private_imports(modules) == ["data/a.py:1 imports multiembed.data.b._hidden"]


def test_no_source_file_over_800_lines() -> None:
    """A reader holds one file at a time: a module that outgrows this is split by step or part."""
    long = {str(m.path.relative_to(REPO)): m.lines for m in import_graph.load().values() if m.lines > 800}
    assert not long, f"over 800 lines: {long}"
