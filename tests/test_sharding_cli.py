"""``multiembed plan``, run in-process: presets and converted directories, JSON output, one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from multiembed.cli import main
from multiembed.data.metadata import DatasetMetadata, FieldSpec, write_metadata
from multiembed.data.presets import preset

SET_WIDTH = 12
SETS = 4


@pytest.fixture
def zoo(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    """Replaces the model zoo's ``build_model`` by a small stand-in of the same shape; records every call.

    The command's own logic (data resolution, optimizer marking, planning, printing) is what these tests check;
    ``test_sharding_models.py`` runs it on the real zoo.
    """
    import torch
    from torch import nn
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    import multiembed.training.build

    calls: List[Dict[str, Any]] = []

    class SparseArch(nn.Module):
        def __init__(self, vocab_sizes: Dict[str, int], device: torch.device) -> None:
            super().__init__()
            configs = [
                EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=SETS * SET_WIDTH, feature_names=[f])
                for f, n in vocab_sizes.items()
            ]
            self.embedding_bag_collection = EmbeddingBagCollection(tables=configs, device=device)
            self.stored_set_dim = self.set_dim = SET_WIDTH
            self.num_sets, self.num_fields = SETS, len(vocab_sizes)

    class SetPool(nn.Module):
        """``[B, K, F, d] -> [B, K, d + num_dense]``: the mean over fields, zero-padded to the over arch's input."""

        def __init__(self, num_dense: int) -> None:
            super().__init__()
            self.num_dense = num_dense

        def forward(self, fields: torch.Tensor) -> torch.Tensor:
            pooled = fields.mean(dim=2)
            return torch.cat([pooled, pooled.new_zeros(*pooled.shape[:2], self.num_dense)], dim=-1)

    class StandIn(nn.Module):
        def __init__(self, vocab_sizes: Dict[str, int], num_dense: int, device: Any, dense_device: Any) -> None:
            super().__init__()
            self.sparse_arch = SparseArch(vocab_sizes, device)
            self.dense_arch = None
            self.set_arch = SetPool(num_dense)
            self.over_arch = nn.Linear(SET_WIDTH + num_dense, 1, device=dense_device)

    def build_model(
        name: str, vocab_sizes: Dict[str, int], num_dense: int = 0, device: Any = None, dense_device: Any = None,
        **options: Any
    ) -> nn.Module:
        calls.append({"name": name, "vocab_sizes": dict(vocab_sizes), "num_dense": num_dense, "device": device})
        return StandIn(dict(vocab_sizes), num_dense, device, dense_device)

    monkeypatch.setattr(multiembed.training.build, "build_model", build_model)
    return calls


def test_plans_a_preset_for_128_gpus_and_writes_the_summary(zoo, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan.json"
    argv = [
        "plan", "--model", "toy-me-4x", "--data", "criteo-1tb", "--world-size", "128", "--local-world-size", "8",
        "--hbm-gb", "80", "--strategy", "column_wise", "--dense-features", "--json", str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    vocab = preset("criteo-1tb").vocab_sizes
    assert zoo[0]["vocab_sizes"] == vocab and zoo[0]["num_dense"] == 13 and str(zoo[0]["device"]) == "meta"
    table_lines = {line.split()[0] for line in printed.splitlines() if line.strip()}
    assert {f"t_{f}" for f in vocab} <= table_lines
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 128 and summary["local_world_size"] == 8
    assert summary["capacity_bytes_per_rank"] == 80 * 2**30
    assert summary["request"]["sparse_optimizer"] == "adam"
    for table in summary["tables"]:
        assert table["sharding_type"] == "column_wise"
        assert [s["col_offset"] for s in table["shards"]] == [k * SET_WIDTH for k in range(SETS)]
        assert len({s["rank"] for s in table["shards"]}) == SETS  # the 4 sets on 4 ranks
        # The command marks the tables with Adam as the trainer does on GPUs: two fp32 states per weight.
        assert table["optimizer"] == "adam"
        assert table["optimizer_bytes"] == 2 * table["weight_bytes"] == 2 * 4 * table["rows"] * table["width"]

    # The MLPerf multi-hot variant sends more ids per sample, nothing else changes.
    assert main(argv[:-2] + ["--multi-hot", "--json", str(out)]) == 0
    multi_hot = json.loads(out.read_text())
    assert multi_hot["communication"]["input_bytes"] > summary["communication"]["input_bytes"]
    assert multi_hot["communication"]["forward_bytes"] == summary["communication"]["forward_bytes"]


@pytest.mark.parametrize("hbm_gb,start", [
    # The whole account does not fit a rank: refused before planning, with both numbers.
    ("1", "multiembed plan: error: --model toy-me-4x: needs about 13.69 GiB per rank"),
    # It fits on average, but table-wise one rank must hold the largest table: the planner refuses.
    ("16", "multiembed plan: error: no sharding plan fits on 8 ranks x 16.00 GiB HBM"),
])
def test_refuses_in_one_line_when_the_model_does_not_fit(zoo, capsys, hbm_gb: str, start: str) -> None:
    argv = [
        "plan", "--model", "toy-me-4x", "--data", "criteo-1tb", "--world-size", "8", "--hbm-gb", hbm_gb,
        "--sharding", "table_wise",
    ]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(start), lines[0]


def test_reads_the_vocabulary_of_a_converted_dataset(zoo, tmp_path: Path, capsys) -> None:
    meta = DatasetMetadata(
        dataset="synthetic",
        fields=[FieldSpec("a", 100), FieldSpec("b", 7)],
        dense_fields=["x", "y"],
        splits={},
        vocab_fingerprint="test",
    )
    write_metadata(tmp_path, meta)
    argv = ["plan", "--model", "toy-me-4x", "--data", str(tmp_path), "--world-size", "2", "--device", "cpu",
            "--strategy", "row_wise", "--dense-features"]
    assert main(argv) == 0
    assert zoo[0]["vocab_sizes"] == {"a": 100, "b": 7} and zoo[0]["num_dense"] == 2
    printed = capsys.readouterr().out
    assert "sparse optimizer adagrad" in printed  # the trainer's CPU default
    assert "t_a" in printed and "t_b" in printed and "row_wise" in printed


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data", "criteo-2tb"], "neither a dataset preset (criteo-kaggle, criteo-1tb, avazu)"),
        (["--data", "/nonexistent/dir"], "/nonexistent/dir: no such dataset directory"),
        (["--data", "avazu", "--multi-hot"], "preset 'avazu' has no multi-hot variant"),
        (["--data", "avazu", "--override", "t_hour"], "expected TABLE=STRATEGY"),
        (["--data", "avazu", "--override", "t_nope=row_wise"], "unknown table 't_nope'"),
        (["--data", "avazu", "--device", "cpu", "--sparse-optimizer", "adam"], "Adam needs a GPU"),
        (["--data", "avazu", "--local-world-size", "3"], "must divide world_size"),
    ],
)
def test_bad_requests_exit_2_with_one_line(zoo, capsys, extra: List[str], needle: str) -> None:
    assert main(["plan", "--model", "toy-me-4x", "--world-size", "8", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_the_command_module_imports_without_torch() -> None:
    code = (
        "import sys, multiembed.cli.plan, multiembed.config;"
        "multiembed.cli.plan.register(__import__('argparse').ArgumentParser().add_subparsers());"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
