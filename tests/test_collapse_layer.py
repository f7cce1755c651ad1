"""``multiembed.collapse`` is a layer of its own: the models do not import it, and its examples run as written."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys

import pytest

MODULES = [
    "multiembed.collapse",
    "multiembed.collapse.spectrum",
    "multiembed.collapse.shards",
    "multiembed.collapse.streaming",
    "multiembed.collapse.result",
    "multiembed.collapse.adapters",
]


def test_importing_the_models_leaves_the_collapse_layer_out() -> None:
    code = (
        "import json, sys, multiembed.models;"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('multiembed.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "multiembed.collapse" not in loaded
    others = [m for m in loaded if m.split(".")[1] not in ("models", "data", "runtime", "config")]
    assert others == [], f"importing multiembed.models also imported {others}"


def test_collapse_layer_imports_no_later_layer() -> None:
    code = (
        "import json, sys, multiembed.collapse;"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('multiembed.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    later = [m for m in json.loads(out) if m.split(".")[1] in ("training", "analysis", "cli")]
    assert later == [], f"importing multiembed.collapse imported later layers: {later}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
