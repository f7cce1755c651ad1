"""The ``Example::`` sections of the model modules (and of a few modules beside them) run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "multiembed.models.names",
    "multiembed.models.layers",
    "multiembed.models.interactions",
    "multiembed.models.set_arch",
    "multiembed.models.over_arch",
    "multiembed.models.sparse_arch",
    "multiembed.models.model",
    "multiembed.models.zoo",
    "multiembed.models.hetero",
    "multiembed.models.backbones",
    "multiembed.models.cpu_fastpath",
    "multiembed.data.loader",
    "multiembed.data.stream_loader",
    "multiembed.data.sources",
    "multiembed.data.synthetic.stream",
    "multiembed.data.metrics",
    "multiembed.data.lines",
    "multiembed.data.convert",
    "multiembed.data.paths",
    "multiembed.serving.outputs",
    "multiembed.config.options",
    "multiembed.cli",
    "multiembed.cli.errors",
    "multiembed.cli.deprecated",
    "multiembed.config.choices",
    "multiembed.data.metadata",
    "multiembed.training.memory",
    "multiembed.training.run_dir",
    "multiembed.training.state",
    "multiembed.config.presets",
    "multiembed.benchmarks.bench_precision",
    "multiembed.benchmarks.bench_train_phases",
    "multiembed.benchmarks.bench_train_yardstick",
    "multiembed.analysis.paper_toy",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
