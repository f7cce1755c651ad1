"""The trainer on 2 gloo ranks: every sharding strategy equals a single-process unsharded run, exactly.

Exact by construction: dropout 0 and weight decay 0, and the reference reproduces what the ranks do - each rank's
batch goes through the model separately (BatchNorm sees per-rank batch statistics) and the loss is the mean of
the per-rank losses, which is DDP's and TorchRec's gradient averaging. Both optimizers are SGD here: Adam's and
Adagrad's first step is lr * g / |g| per element, which turns float32 summation-order differences in near-zero
gradients (sharded pooling and DDP's bucketed all-reduce add in another order) into full-size weight differences;
SGD's update is linear in the gradient, so those differences stay at rounding level and 1e-5 is a real bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from dist_utils import run_ranks
from multiembed.cli import main as cli_main

pytestmark = pytest.mark.multiprocess

MODEL = "dcnv2-me-2x"
STEPS = 3
LOCAL_BATCH = 32
STRATEGIES = ["table_wise", "column_wise", "row_wise", "data_parallel"]
SPARSE_LR = 0.5
DENSE_LR = 0.5


def _options(data: Path, out: Path, strategy: str) -> Dict:
    return dict(
        data=str(data), model=MODEL, out=str(out), max_steps=STEPS, batch_size=2 * LOCAL_BATCH, dropout=0.0,
        weight_decay=0.0, sparse_optimizer="sgd", sparse_lr=SPARSE_LR, dense_optimizer="sgd", lr=DENSE_LR,
        sharding=strategy, patience=0, progress=False, hidden=32, epochs=1, device="cpu",
    )


def full_state(module: torch.nn.Module, rank: int) -> Dict[str, torch.Tensor]:
    """Every tensor of ``module.state_dict()`` whole on rank 0 (sharded tables gathered)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    out: Dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size()) if rank == 0 else None
            value.gather(dst=0, out=full)
            if rank == 0:
                out[key] = full
        elif isinstance(value, DTensor):
            out[key] = value.full_tensor()
        else:
            out[key] = value.detach().clone()
    return out


def _train_worker(rank: int, world_size: int, data: str, root: str, strategies) -> None:
    from multiembed.training.trainer import TrainConfig, Trainer

    for strategy in strategies:
        trainer = Trainer(TrainConfig(**_options(Path(data), Path(root) / strategy, strategy)))
        initial = full_state(trainer.dmp, rank)
        trainer.fit()
        pipelined = len(trainer.pipeline._pipelined_modules)
        final = full_state(trainer.dmp, rank)
        if rank == 0:
            torch.save({"initial": initial, "final": final, "pipelined": pipelined}, Path(root) / f"{strategy}.pt")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli_main(["synth", "--rows", "4000", "--out", str(out), "--seed", "1", "--scale", "0.001"]) == 0
    return out


def _reference(data: Path, initial: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """STEPS steps of the unsharded model on the ranks' batches, with the trainer's update rules."""
    from multiembed.data.loader import ParquetBatchLoader
    from multiembed.data.metadata import read_metadata
    from multiembed.models import MultiEmbeddingTrain, build_model

    meta = read_metadata(data)
    model = build_model(MODEL, meta.vocab_sizes, device=torch.device("cpu"), hidden=32, dropout=0.0)
    train = MultiEmbeddingTrain(model)
    train.load_state_dict(initial)
    tables = [p for n, p in train.named_parameters() if ".embedding_bags." in n]
    dense = [p for n, p in train.named_parameters() if ".embedding_bags." not in n]
    sparse_opt = torch.optim.SGD(tables, lr=SPARSE_LR)
    dense_opt = torch.optim.SGD(dense, lr=DENSE_LR)
    loaders = [
        ParquetBatchLoader(data, "train", LOCAL_BATCH, rank=r, world_size=2, shuffle=True, seed=0, last_batch="drop",
                           use_dense=False)
        for r in range(2)
    ]
    streams = [iter(loader.iter_epoch(0)) for loader in loaders]
    train.train()
    for _ in range(STEPS):
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        losses = [train(next(stream))[0] for stream in streams]
        torch.stack(losses).mean().backward()
        sparse_opt.step()
        dense_opt.step()
    return train.state_dict()


def _train_mode_logits(data: Path, state: Dict[str, torch.Tensor]) -> torch.Tensor:
    from multiembed.data.loader import ParquetBatchLoader
    from multiembed.data.metadata import read_metadata
    from multiembed.models import MultiEmbeddingTrain, build_model

    model = build_model(MODEL, read_metadata(data).vocab_sizes, device=torch.device("cpu"), hidden=32, dropout=0.0)
    train = MultiEmbeddingTrain(model)
    train.load_state_dict(state)
    batch = next(iter(ParquetBatchLoader(data, "val", LOCAL_BATCH, use_dense=False)))
    return train(batch)[1][1]


@pytest.mark.slow
def test_every_sharding_strategy_equals_the_unsharded_reference(synthetic: Path, tmp_path: Path) -> None:
    run_ranks(_train_worker, 2, str(synthetic), str(tmp_path), STRATEGIES)
    for strategy in STRATEGIES:
        result = torch.load(tmp_path / f"{strategy}.pt")
        assert result["pipelined"] >= 1, f"{strategy}: TorchRec did not pipeline the sharded module"
        expected = _reference(synthetic, result["initial"])
        final = result["final"]
        # The comparison only means something if training moved the weights far beyond the tolerance.
        moved = {
            k: (final[k] - result["initial"][k]).abs().max().item() for k in expected if k.endswith("weight")
        }
        assert max(v for k, v in moved.items() if ".embedding_bags." in k) > 1e-2, f"{strategy}: tables barely moved"
        assert max(v for k, v in moved.items() if ".embedding_bags." not in k) > 1e-2, f"{strategy}: dense barely moved"
        for key, value in expected.items():
            if key.endswith("num_batches_tracked") or "running_" in key:
                continue  # BatchNorm statistics: each rank follows its own batches, the reference both in turn
            torch.testing.assert_close(final[key], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{strategy}: {key}: {m}")
        torch.testing.assert_close(
            _train_mode_logits(synthetic, final), _train_mode_logits(synthetic, expected), atol=1e-5, rtol=1e-5
        )


class _Interrupted(Exception):
    """Stands in for a crash right after a checkpoint was published."""


def _resume_worker(rank: int, world_size: int, data: str, root: str, stop_at: int) -> None:
    from multiembed.training.trainer import TrainConfig, Trainer

    options = dict(
        data=data, model=MODEL, batch_size=2 * LOCAL_BATCH, hidden=32, epochs=2, max_steps=RESUME_STEPS,
        eval_every=4, checkpoint_every=2, patience=0, progress=False, device="cpu", sharding="auto",
    )

    class CrashingTrainer(Trainer):
        def save(self) -> Path:
            path = super().save()
            if self.state.step == stop_at:
                raise _Interrupted()
            return path

    uninterrupted = Trainer(TrainConfig(out=str(Path(root) / "uninterrupted"), **options))
    uninterrupted.fit()
    expected = full_state(uninterrupted.dmp, rank)
    with pytest.raises(_Interrupted):
        CrashingTrainer(TrainConfig(out=str(Path(root) / "resumed"), **options)).fit()
    resumed = Trainer(TrainConfig(out=str(Path(root) / "resumed"), resume=True, **options))
    resumed.fit()
    final = full_state(resumed.dmp, rank)
    if rank == 0:
        torch.save({"expected": expected, "final": final}, Path(root) / "states.pt")


RESUME_STEPS = 10


@pytest.mark.slow
def test_resume_after_a_crash_ends_exactly_like_the_uninterrupted_run(synthetic: Path, tmp_path: Path) -> None:
    """Default optimizers (Adagrad + Adam) and dropout: exactness needs the optimizer state, the schedule, the data
    position and every rank's RNG restored, which is what this checks."""
    import json

    stop_at = 6  # after a checkpoint, between two evaluations (4 and 8)
    run_ranks(_resume_worker, 2, str(synthetic), str(tmp_path), stop_at)
    states = torch.load(tmp_path / "states.pt")
    assert states["expected"].keys() == states["final"].keys()
    for key, value in states["expected"].items():
        torch.testing.assert_close(states["final"][key], value, atol=0, rtol=0, msg=lambda m: f"{key}: {m}")

    def summary(run: str) -> dict:
        return json.loads((tmp_path / run / "summary.json").read_text())

    def evaluations(run: str) -> list:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("samples_per_s", "loader_share")}
                for line in lines]

    resumed, uninterrupted = summary("resumed"), summary("uninterrupted")
    assert resumed["steps"] == uninterrupted["steps"] == RESUME_STEPS
    for key in ("best_step", "val_auc", "val_logloss", "test_auc", "test_logloss", "test_ne"):
        assert resumed[key] == uninterrupted[key], key
    assert evaluations("resumed") == evaluations("uninterrupted")
    log = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert len(log.splitlines()) == 3  # steps 4, 8 and the step limit at 10: none lost or repeated by the crash


@pytest.mark.slow
def test_a_two_rank_checkpoint_evaluates_on_one_rank(synthetic: Path, tmp_path: Path, capsys) -> None:
    import json

    run_ranks(_two_rank_run_worker, 2, str(synthetic), str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    capsys.readouterr()
    assert cli_main(["evaluate", str(tmp_path / "run"), "--data", str(synthetic), "--device", "cpu"]) == 0
    one_rank = json.loads(capsys.readouterr().out)
    assert one_rank["test_rows"] == summary["test_rows"]
    for key in ("test_logloss", "test_ne"):
        assert one_rank[key] == pytest.approx(summary[key], abs=1e-6), key
    # One rank pools each bag in another order than two row-wise shards, so logits agree to float32 rounding and a
    # pair of near-tied predictions can swap: one swapped (positive, negative) pair moves the AUC by 1 / (P * N),
    # 3.3e-5 for these 400 test rows.
    assert one_rank["test_auc"] == pytest.approx(summary["test_auc"], abs=1e-4)


def _two_rank_run_worker(rank: int, world_size: int, data: str, out: str) -> None:
    from multiembed.training.trainer import TrainConfig, Trainer

    Trainer(
        TrainConfig(
            data=data, out=out, model=MODEL, batch_size=2 * LOCAL_BATCH, hidden=32, max_steps=6, patience=0,
            progress=False, device="cpu", sharding="row_wise",
        )
    ).fit()
