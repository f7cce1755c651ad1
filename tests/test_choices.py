"""Each choice is defined once (``multiembed.config.choices``) and every layer checks it through that enum; ``plan``
and ``train`` spell and mean their shared options the same way."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from multiembed.cli import main
from multiembed.config import TrainConfig
from multiembed.config.choices import (
    Combiner,
    DenseOptimizer,
    Device,
    InitScheme,
    Layout,
    Precision,
    SparseOptimizer,
    TableDtype,
)


def test_layers_use_the_enums_spellings() -> None:
    from multiembed.models import COMBINERS, INIT_SCHEMES, LAYOUTS
    from multiembed.models.precision import PRECISIONS, TABLE_DTYPES
    from multiembed.training.optim import CPU_SPARSE_OPTIMIZERS, DENSE_OPTIMIZERS, SPARSE_OPTIMIZERS

    assert LAYOUTS == Layout.values() and INIT_SCHEMES == InitScheme.values() and COMBINERS == Combiner.values()
    assert PRECISIONS == Precision.values() and TABLE_DTYPES == TableDtype.values()
    assert tuple(SPARSE_OPTIMIZERS) == SparseOptimizer.values() and DENSE_OPTIMIZERS == DenseOptimizer.values()
    assert CPU_SPARSE_OPTIMIZERS == ("adagrad", "rowwise_adagrad", "sgd")


def test_every_layer_refuses_an_unknown_choice_in_the_same_words() -> None:
    from multiembed.models.precision import check_precision
    from multiembed.models.sparse_arch import init_bound
    from multiembed.training.distributed import init_distributed

    with pytest.raises(ValueError, match=r"^--device: unknown 'gpu'; choose from auto, cpu, cuda$"):
        init_distributed("gpu")
    with pytest.raises(ValueError, match=r"^--precision: unknown 'fp8'; choose from fp32, bf16$"):
        check_precision("fp8", "cpu")
    with pytest.raises(ValueError, match=r"^init: unknown init 'he'; choose from xavier_set, xavier_field, torchrec$"):
        init_bound("he", {"a": 10}, "a", 4)
    assert Device.parse("cuda", "--device") is Device.CUDA


def _plan(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "plan.json"
    argv = ["plan", "--model", "dnn-me-2x", "--data", "criteo-kaggle", "--world-size", "4", "--device", "cpu",
            "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_plan_batch_size_is_the_global_batch_as_in_train(tmp_path: Path) -> None:
    assert TrainConfig.__dataclass_fields__["batch_size"].default == 2048
    assert _plan(tmp_path, "--batch-size", "2048")["batch_size_per_rank"] == 512
    assert _plan(tmp_path)["batch_size_per_rank"] == 512


def test_plan_refuses_a_batch_that_does_not_split_over_the_ranks(tmp_path: Path, capsys) -> None:
    argv = ["plan", "--model", "dnn-me-2x", "--data", "criteo-kaggle", "--world-size", "3", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["multiembed plan: error: --batch-size 2048 is the global batch and must divide evenly over 3 ranks"]


def test_plan_takes_trains_sharding_spelling_and_the_old_one_with_a_one_line_warning(tmp_path: Path) -> None:
    new = _plan(tmp_path, "--sharding", "row_wise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = _plan(tmp_path, "--strategy", "row_wise")
    assert new["tables"] == old["tables"]
    assert {t["sharding_type"] for t in new["tables"]} == {"row_wise"}
    deprecated = [w for w in caught if "deprecated" in str(w.message)]
    assert [str(w.message) for w in deprecated] == [
        "multiembed plan: warning: --strategy is deprecated; use --sharding (same values)"
    ]
    line = warnings.formatwarning(deprecated[0].message, deprecated[0].category, "f.py", 1)
    assert line == str(deprecated[0].message) + "\n"
