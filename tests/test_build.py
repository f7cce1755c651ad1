"""The one build path: ``multiembed plan`` and the trainer agree on every table's optimizer and state size."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from multiembed.cli import main as cli_main
from multiembed.config import TrainConfig
from multiembed.data.metadata import read_metadata


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli_main(["synth", "--rows", "2000", "--out", str(out), "--seed", "3", "--scale", "0.001", "--no-progress"]) == 0
    return out


def _state_bytes_per_table(optimizer: torch.optim.Optimizer, tables) -> Dict[str, int]:
    """Bytes of optimizer state the built optimizer holds for each embedding table (scalar step counters aside)."""
    totals = {name: 0 for name in tables}
    for key, entry in optimizer.state_dict()["state"].items():
        if ".embedding_bags." not in key:
            continue
        table = key.split(".embedding_bags.")[1].split(".")[0]
        for value in entry.values():
            tensors = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 1:
                    totals[table] += tensor.numel() * tensor.element_size()
    return totals


@pytest.mark.parametrize(
    "sharding, sparse_optimizer",
    [("table_wise", "adagrad"), ("data_parallel", "adagrad"), ("data_parallel", "sgd"), ("row_wise", "rowwise_adagrad")],
)
def test_plan_and_trainer_agree_on_each_tables_optimizer_and_state(
    synthetic: Path, tmp_path: Path, sharding: str, sparse_optimizer: str
) -> None:
    from multiembed.training.build import build_training, plan_model
    from multiembed.training.distributed import destroy, init_distributed

    meta = read_metadata(synthetic)
    config = TrainConfig(
        data=str(synthetic), model="dcnv2-me-2x", out=str(tmp_path), hidden=16, sharding=sharding,
        sparse_optimizer=sparse_optimizer, device="cpu",
    )
    on_paper = plan_model(
        config, meta.vocab_sizes, num_dense=0, world_size=1, local_world_size=1, device_type="cpu", batch_size=64
    )
    ctx = init_distributed("cpu")
    try:
        built = build_training(config, meta.vocab_sizes, num_dense=0, ctx=ctx, local_batch=64)
        held = _state_bytes_per_table(built.optimizer, [t["name"] for t in on_paper.summary["tables"]])
        for table in on_paper.summary["tables"]:
            assert table["sharding_type"] == sharding
            assert table["optimizer"] == sparse_optimizer, table["name"]
            assert held[table["name"]] == table["optimizer_bytes"], table["name"]
        assert built.planned.summary["tables"] == on_paper.summary["tables"]
        if sparse_optimizer != "sgd":
            assert sum(held.values()) > 0  # the comparison is not between two zeros
    finally:
        destroy()


def test_plan_and_trainer_refuse_rowwise_adagrad_on_replicated_tables_alike(synthetic: Path, tmp_path: Path, capsys) -> None:
    argv = ["--sparse-optimizer", "rowwise_adagrad"]
    assert cli_main(["plan", "--model", "dcnv2-me-2x", "--data", str(synthetic), "--world-size", "2", "--device",
                     "cpu", "--strategy", "data_parallel", *argv]) == 2
    plan_error = capsys.readouterr().err.strip()
    assert cli_main(["train", "--data", str(synthetic), "--out", str(tmp_path / "run"), "--model", "dcnv2-me-2x",
                     "--device", "cpu", "--sharding", "data_parallel", "--hidden", "16", "--no-progress", *argv]) == 2
    train_error = capsys.readouterr().err.strip().splitlines()[-1]
    for error in (plan_error, train_error):
        assert len(error.splitlines()) == 1 and "no element-wise torch equivalent" in error, error
    assert plan_error.split("error: ", 1)[1] == train_error.split("error: ", 1)[1]
