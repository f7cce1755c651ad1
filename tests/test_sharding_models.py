"""Plans for the model zoo's real models (``build_model``), on paper; the sharded forward pass on 2 ranks is in
``test_sharding_dist.py``."""

from __future__ import annotations

import pytest

import torch

from multiembed.cli import main
from multiembed.data.presets import preset
from multiembed.models import build_model
from multiembed.sharding import embedding_tables, format_plan, plan_sharding, plan_summary

EBC_PATH = "sparse_arch.embedding_bag_collection"


def test_column_wise_puts_the_four_sets_of_every_criteo_1tb_table_on_four_ranks() -> None:
    vocab = preset("criteo-1tb").vocab_sizes
    model = build_model("dcnv2-me-4x", vocab, num_dense=13, device=torch.device("meta"))
    set_width = model.sparse_arch.stored_set_dim
    plan = plan_sharding(model, "column_wise", world_size=128, local_world_size=8, device_type="cuda", hbm_gb=80)
    shardings = plan.plan[EBC_PATH]
    assert len(shardings) == len(vocab)
    for sharding in shardings.values():
        shards = sharding.sharding_spec.shards
        assert [s.shard_offsets[1] for s in shards] == [k * set_width for k in range(4)]
        assert len({s.placement.rank() for s in shards}) == 4
    text = format_plan(plan, model, world_size=128, local_world_size=8)
    assert {t.name for t in embedding_tables(model)} <= {line.split()[0] for line in text.splitlines()}


def test_both_table_layouts_hold_the_same_embedding_bytes() -> None:
    vocab = preset("criteo-kaggle").vocab_sizes
    totals = {}
    for layout in ("fused", "per_set"):
        model = build_model("dcnv2-me-4x", vocab, device=torch.device("meta"), layout=layout)
        plan = plan_sharding(model, "table_wise", world_size=16, local_world_size=8, device_type="cuda", hbm_gb=16)
        summary = plan_summary(plan, model, world_size=16, local_world_size=8)
        expected_tables = len(vocab) * (1 if layout == "fused" else 4)
        assert len(summary["tables"]) == expected_tables
        totals[layout] = sum(t["weight_bytes"] for t in summary["tables"])
    set_width = build_model("dcnv2-me-4x", vocab, device=torch.device("meta")).sparse_arch.stored_set_dim
    assert totals["fused"] == totals["per_set"] == sum(vocab.values()) * 4 * set_width * 4


@pytest.mark.parametrize("strategy", ["table_wise", "row_wise"])
def test_plan_command_on_a_zoo_model(strategy: str, capsys) -> None:
    argv = [
        "plan", "--model", "dcnv2-me-4x", "--data", "criteo-kaggle", "--world-size", "16", "--local-world-size", "8",
        "--hbm-gb", "16", "--strategy", strategy,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dcnv2-me-4x on criteo-kaggle (vocabulary sizes are estimates)" in out
    assert out.count(f" {strategy} ") == len(preset("criteo-kaggle").vocab_sizes)
