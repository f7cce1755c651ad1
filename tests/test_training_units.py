"""Trainer building blocks that need no model: optimizer defaults, checkpoints, metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from multiembed.data.metrics import roc_auc
from multiembed.training import checkpoint as ckpt
from multiembed.training.distributed import init_distributed
from multiembed.training.metrics import EvalMetrics
from multiembed.training.optim import OptimizerConfig


@pytest.fixture(scope="module")
def one_rank():
    return init_distributed("cpu")


def test_cpu_defaults_are_adagrad_for_tables_and_adam_for_dense() -> None:
    cfg = OptimizerConfig.for_device("cpu")
    assert (cfg.sparse_optimizer, cfg.sparse_lr, cfg.lr, cfg.weight_decay) == ("adagrad", 0.05, 1e-3, 1e-6)


def test_gpu_defaults_are_the_papers_adam() -> None:
    cfg = OptimizerConfig.for_device("cuda")
    assert (cfg.sparse_optimizer, cfg.sparse_lr, cfg.lr, cfg.weight_decay) == ("adam", 1e-3, 1e-3, 1e-6)


def test_sparse_adam_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Adam needs a GPU"):
        OptimizerConfig.for_device("cpu", sparse_optimizer="adam")


def test_unknown_optimizer_and_negative_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown 'lamb'"):
        OptimizerConfig.for_device("cpu", sparse_optimizer="lamb")
    with pytest.raises(ValueError, match="--lr: must be >= 0"):
        OptimizerConfig.for_device("cpu", lr=-1.0)


def test_eval_metrics_match_a_direct_computation_and_ignore_padding(one_rank) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1000, generator=g)
    labels = (torch.rand(1000, generator=g) < torch.sigmoid(logits)).float()
    weights = torch.ones(1000)
    weights[-37:] = 0.0  # padding rows: copies that must not count
    labels[-37:] = 1.0
    logits[-37:] = -9.0
    metrics = EvalMetrics(rows_per_rank=1000, batch_size=100, world_size=1, rank=0, device=torch.device("cpu"))
    for start in range(0, 1000, 100):
        metrics.update(logits[start : start + 100], labels[start : start + 100], weights[start : start + 100])
    result = metrics.compute()
    real = weights == 1
    p = torch.sigmoid(logits[real]).double()
    y = labels[real].double()
    logloss = float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
    rate = float(y.mean())
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert result["rows"] == 963
    assert result["auc"] == pytest.approx(roc_auc(labels[real].numpy(), logits[real].numpy()), abs=1e-6)
    assert result["logloss"] == pytest.approx(logloss, rel=1e-6)
    assert result["ne"] == pytest.approx(logloss / entropy, rel=1e-6)
    assert result["calibration"] == pytest.approx(float(p.sum() / y.sum()), rel=1e-6)


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 8, generator=g)}, "progress": {"step": torch.tensor(5.0)}}


def test_checkpoint_round_trip_and_newest_is_chosen(tmp_path: Path, one_rank) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _state(1), {"epoch": 0})
    ckpt.save_checkpoint(tmp_path, 2, _state(2), {"epoch": 0})
    newest = ckpt.newest_valid_checkpoint(tmp_path)
    assert newest is not None and newest.name == "step-00000002"
    loaded = {"model": {"w": torch.zeros(64, 8)}, "progress": {"step": torch.tensor(0.0)}}
    ckpt.load_checkpoint(newest, loaded)
    torch.testing.assert_close(loaded["model"]["w"], _state(2)["model"]["w"])
    assert json.loads((newest / ckpt.MANIFEST).read_text())["info"] == {"epoch": 0}


def test_corrupted_checkpoint_is_reported_and_skipped(tmp_path: Path, one_rank) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _state(1), {})
    second = ckpt.save_checkpoint(tmp_path, 2, _state(2), {})
    data_file = max((p for p in second.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    messages = []
    chosen = ckpt.newest_valid_checkpoint(tmp_path, report=messages.append)
    assert chosen is not None and chosen.name == "step-00000001"
    assert len(messages) == 1 and "checksum mismatch" in messages[0] and data_file.name in messages[0]


def test_truncated_checkpoint_is_reported(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path, 3, _state(3), {})
    data_file = next(path.rglob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.verify_checkpoint(path)


def test_interrupted_save_leaves_the_previous_checkpoint_in_charge(tmp_path: Path, one_rank, monkeypatch) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _state(1), {})

    class Killed(Exception):
        pass

    def die(tmp_dir: Path) -> None:
        raise Killed(str(tmp_dir))

    monkeypatch.setattr(ckpt, "_before_publish_hook", die)
    with pytest.raises(Killed):
        ckpt.save_checkpoint(tmp_path, 2, _state(2), {})
    monkeypatch.setattr(ckpt, "_before_publish_hook", None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert ckpt.newest_valid_checkpoint(tmp_path).name == "step-00000001"
    # The next save clears the abandoned temporary directory.
    ckpt.save_checkpoint(tmp_path, 3, _state(3), {})
    assert not list((tmp_path / ckpt.CHECKPOINT_DIR).glob(".tmp-*"))


def test_checkpoint_without_manifest_is_incomplete(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path, 4, _state(4), {})
    (path / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(path)
    assert ckpt.newest_valid_checkpoint(tmp_path, report=lambda m: None) is None


@pytest.mark.parametrize("warmup,decay_start,decay_steps", [(0, 0, 0), (4, 0, 0), (3, 3, 5), (2, 6, 4), (0, 5, 5)])
def test_the_lr_schedule_warms_up_holds_decays_to_zero_and_stays_there(warmup, decay_start, decay_steps) -> None:
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.warmup import WarmupOptimizer

    config = OptimizerConfig.for_device(
        "cpu", lr=0.5, warmup_steps=warmup, decay_start=decay_start, decay_steps=decay_steps
    )
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = WarmupOptimizer(
        KeyedOptimizerWrapper({"w": weight}, lambda p: torch.optim.SGD(p, lr=0.5)), config.schedule(), lr=0.5
    )
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(2)
        optimizer.step()

    def expected(step: int) -> float:  # the rate used by the step with this index (0-based)
        if warmup and step < warmup:
            return 0.5 * step / warmup
        if decay_steps and step >= decay_start:
            return 0.5 * max(0.0, 1 - (step - decay_start) / decay_steps)
        return 0.5

    assert lrs == pytest.approx([expected(i) for i in range(20)], abs=1e-12)


def test_collectives_are_the_identity_in_a_one_rank_job() -> None:
    from multiembed.training import distributed

    t = torch.tensor([3.0])
    assert distributed.all_reduce_sum(t) is t and t.item() == 3.0
    assert distributed.all_ranks_agree(True) and not distributed.all_ranks_agree(False)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    distributed.raise_collectively(None)
    with pytest.raises(ValueError, match="^rank 0 found this$"):
        distributed.raise_collectively("rank 0 found this")


def _collectives_on_two_ranks(rank: int, world_size: int) -> None:
    from multiembed.training import distributed

    ctx = distributed.init_distributed("cpu")
    try:
        assert ctx.world_size == 2 and distributed.is_multi_rank()
        assert distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item() == 3.0
        assert distributed.all_ranks_agree(True) and not distributed.all_ranks_agree(rank == 0)
        assert distributed.all_gather_object(rank * 10) == [0, 10]
        assert distributed.broadcast_object(f"from {rank}") == "from 0"
        with pytest.raises(ValueError, match="^found on rank 0$"):
            distributed.raise_collectively("found on rank 0" if rank == 0 else None)
    finally:
        distributed.destroy()


@pytest.mark.multiprocess
def test_collectives_on_two_gloo_ranks() -> None:
    from dist_utils import run_ranks

    run_ranks(_collectives_on_two_ranks, 2)


def test_retention_deletes_only_the_checkpoints_it_wrote(tmp_path: Path, one_rank) -> None:
    """A directory named like a checkpoint that save_checkpoint did not publish (no manifest of its step), and a
    link named like one, survive pruning with what they hold; the superseded real checkpoint goes."""
    old = ckpt.save_checkpoint(tmp_path, 1, _state(1), {})
    root = tmp_path / ckpt.CHECKPOINT_DIR
    notes = root / ckpt.step_dir_name(2)
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"keep")
    (root / ckpt.step_dir_name(3)).symlink_to(elsewhere, target_is_directory=True)
    forged = root / ckpt.step_dir_name(4)
    forged.mkdir()
    (forged / ckpt.MANIFEST).write_text(json.dumps({"step": 9, "files": {}}))
    newest = ckpt.save_checkpoint(tmp_path, 5, _state(5), {})
    ckpt.prune_checkpoints(tmp_path, [newest])
    assert not old.exists()
    assert (notes / "notes.txt").read_text() == "mine"
    assert (root / ckpt.step_dir_name(3)).is_symlink() and (elsewhere / "data.bin").read_bytes() == b"keep"
    assert (forged / ckpt.MANIFEST).is_file()
    assert newest.is_dir() and ckpt.written_by_save(newest) and not ckpt.written_by_save(forged)
