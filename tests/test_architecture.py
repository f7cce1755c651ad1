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
