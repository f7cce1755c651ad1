"""Evaluation of a built model over a split, and a finished run's model rebuilt from its ``config.json``.

Evaluation goes through the same pipeline as training (TorchRec pipelines the sharded lookup), every row of the
split exactly once over all ranks (the last batch padded with zero-weight rows), metrics from
:class:`~multiembed.training.metrics.EvalMetrics`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from multiembed.config import TrainConfig
from multiembed.data.sources import open_split
from multiembed.data.metadata import DatasetMetadata, read_metadata, split_identity
from multiembed.training import checkpoint as ckpt
from multiembed.training.build import BuiltTraining, build_training
from multiembed.training.distributed import DistContext, all_reduce_sum, init_distributed
from multiembed.training.metrics import EvalMetrics
from multiembed.training.run_dir import RunDir

# Every batch-norm kind whose running statistics ranks must agree on (a lazy one becomes one of these at its first
# forward, before it has statistics).
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def average_batch_norm_statistics(module: torch.nn.Module, world_size: int) -> None:
    """Makes every rank's BatchNorm running statistics the mean over ranks (a collective).

    TorchRec wraps the dense part in DDP with ``broadcast_buffers=False``, so each rank's running statistics
    follow its own batches. Left alone, ranks would evaluate slightly different models, and a checkpoint
    (DCP keeps one copy of a key every rank saves) would hold one rank's statistics, so a resumed run would
    evaluate differently from an uninterrupted one. Averaging before every evaluation and checkpoint gives
    one model everywhere, the statistics of all ranks' batches, and exact resumes.
    """
    if world_size == 1:
        return
    for child in module.modules():
        if isinstance(child, _BATCH_NORMS) and child.track_running_stats:
            for statistic in (child.running_mean, child.running_var):
                all_reduce_sum(statistic).div_(world_size)


def evaluate_split(
    built: BuiltTraining, data_dir: str, split: str, *, ctx: DistContext, local_batch: int, use_dense: bool
) -> Dict[str, float]:
    """Evaluates every row of ``split`` exactly once over all ranks (a collective).

    Returns:
        ``{"auc", "logloss", "ne", "calibration", "rows", ...}`` as :class:`EvalMetrics` computes them.
    """
    average_batch_norm_statistics(built.dmp, ctx.world_size)
    loader = open_split(
        data_dir, split, local_batch, rank=ctx.rank, world_size=ctx.world_size, shuffle=False, last_batch="pad",
        use_dense=use_dense,
    )
    metrics = EvalMetrics(
        rows_per_rank=loader.num_batches * local_batch, batch_size=local_batch, world_size=ctx.world_size,
        rank=ctx.rank, device=ctx.device,
    )
    built.dmp.eval()
    batches = iter(loader)
    with torch.no_grad():
        while True:
            try:
                _, logits, labels, weights = built.pipeline.progress(batches)
            except StopIteration:
                break
            metrics.update(logits, labels, weights)
    built.dmp.train()
    return metrics.compute()


def load_model_weights(built: BuiltTraining, path: Path) -> None:
    """Loads only the model's weights from a checkpoint (any world size or sharding it was saved with)."""
    state = {"model": built.dmp.state_dict()}
    ckpt.load_checkpoint(path, state)
    built.dmp.load_state_dict(state["model"])


# How often a load moves on after the checkpoint it chose was deleted under it.
_VANISHED_RETRIES = 5


def _shares_rows(trained: Optional[Dict[str, Any]], data: Optional[Dict[str, Any]]) -> bool:
    """Whether two datasets' split recipes draw on the same rows (a common input file, or the same synthetic
    stream), so that assigning them to splits differently would put training rows into evaluation splits. Two days
    of a synthetic log draw their rows from streams seeded by the day, so different days share none."""
    if not trained or not data or trained.get("producer") != data.get("producer"):
        return False
    if trained.get("producer") == "convert":
        hashes = {i.get("sha256") for i in trained.get("inputs", [])} - {None}
        return bool(hashes & {i.get("sha256") for i in data.get("inputs", [])})
    if trained.get("producer") in ("synthetic", "synthetic-stream"):
        return (
            trained.get("seed") == data.get("seed") and trained.get("model") == data.get("model")
            and trained.get("day") == data.get("day")
        )
    return False


def split_problem(record: Dict[str, Any], meta: DatasetMetadata, data_dir: str, where: Path) -> Optional[str]:
    """Why ``data_dir``'s splits cannot be trusted against a run's training data (None: they can).

    Same vocabulary is not enough: a dataset made from the same rows with another seed or split puts training
    rows into its validation and test splits. A dataset made from other rows (held-out days converted with
    ``--vocab-from``) may split as it likes.
    """
    data = record.get("data", {})
    trained, current = data.get("split_identity"), split_identity(meta)
    if trained is None or current is None or trained == current:
        return None
    if not _shares_rows(data.get("split_recipe"), meta.split_recipe):
        return None
    return (
        f"{data_dir}: splits its rows differently from the run's training data (split identity {current[:16]}... "
        f"vs {trained[:16]}... in {where}), so its val/test rows may have been trained on; use the training "
        "data's own conversion"
    )


@dataclasses.dataclass
class RunModel:
    """A run's model rebuilt exactly as it was trained (from ``config.json``), sharded over this job's ranks.

    Attributes:
        run_dir: the run directory.
        record: its ``config.json``.
        config: the run's options (as recorded; ``device`` as asked).
        built: the built model (weights as initialised until :meth:`load` is called).
        ctx: this process's place in the job.
    """

    run_dir: Path
    record: Dict[str, Any]
    config: TrainConfig
    built: BuiltTraining
    ctx: DistContext

    @property
    def files(self) -> RunDir:
        """The run directory's files (:class:`~multiembed.training.run_dir.RunDir`)."""
        return RunDir(self.run_dir)

    @property
    def local_batch(self) -> int:
        return max(self.config.batch_size // self.ctx.world_size, 1)

    def load(self, checkpoint: Optional[Path] = None) -> Path:
        """Loads the weights of ``checkpoint`` (default: the run's best); returns its path.

        The run may still be training: its retention can delete the checkpoint chosen here while it is read. In a
        one-process job the load then moves on to the run's best complete checkpoint as it is now (a checkpoint
        that is still in place and fails to load is an error, as is one of several ranks).

        Raises:
            ValueError: no complete checkpoint, or the checkpoint does not load (one line naming it).
        """
        if checkpoint is not None:
            load_model_weights(self.built, Path(checkpoint))
            return Path(checkpoint)
        for _ in range(_VANISHED_RETRIES):
            path = self.files.best_checkpoint()
            try:
                load_model_weights(self.built, path)
                return path
            except (ValueError, OSError) as e:
                if self.ctx.world_size > 1 or (path / ckpt.MANIFEST).is_file():
                    raise
                error = e  # deleted under the load: the best complete checkpoint as it is now
        raise ValueError(f"{self.run_dir}: its checkpoints were deleted while being read, {_VANISHED_RETRIES} "
                         f"times (a running training's retention); the last: {error}")

    def check_data(self, meta: DatasetMetadata, data_dir: str) -> None:
        """Refuses data whose vocabulary differs from the run's training data, or that splits the training rows
        differently (:func:`split_problem`).

        Raises:
            ValueError: one line naming both fingerprints and ``config.json``.
        """
        trained_on = self.record.get("data", {}).get("vocab_fingerprint")
        if trained_on and meta.vocab_fingerprint != trained_on:
            raise ValueError(
                f"{data_dir}: vocabulary fingerprint {meta.vocab_fingerprint[:16]}... differs from the run's "
                f"({trained_on[:16]}...) in {self.files.config_file}; convert the data with --vocab-from the "
                "training data's directory"
            )
        problem = split_problem(self.record, meta, data_dir, self.files.config_file)
        if problem:
            raise ValueError(problem)

    def evaluate(self, data_dir: str, split: str = "test") -> Dict[str, float]:
        """Evaluates the loaded weights on ``split`` of ``data_dir`` (a collective).

        Raises:
            ValueError: unreadable data, another vocabulary, or an empty split.
        """
        meta = read_metadata(data_dir)
        self.check_data(meta, data_dir)
        if meta.split_rows().get(split, 0) == 0:
            raise ValueError(f"{data_dir}: split {split!r} has no rows")
        return evaluate_split(
            self.built, data_dir, split, ctx=self.ctx, local_batch=self.local_batch,
            use_dense=self.config.dense_features,
        )


def model_for_run(run_dir: Path, device: str = "auto", ctx: Optional[DistContext] = None) -> RunModel:
    """Rebuilds a run's model from its ``config.json`` (vocabulary included; no dataset needed), weights not loaded.

    Args:
        run_dir: the run directory (anywhere: runs can be moved and copied).
        device: ``auto``, ``cpu`` or ``cuda``.
        ctx: this process's place in the job (``init_distributed()`` when omitted).

    Raises:
        ValueError: not a run directory, or a ``config.json`` without its vocabulary.
    """
    run = RunDir(run_dir)
    record = run.read_config()
    data = record.get("data", {})
    if "vocab_sizes" not in data:
        raise ValueError(f"{run.config_file}: records no vocabulary (data.vocab_sizes)")
    config = run.train_config(record, resume=False, overwrite=False, progress=False, device=device)
    ctx = ctx or init_distributed(config.device)
    local_batch = max(config.batch_size // ctx.world_size, 1)
    num_dense = 0
    if config.dense_features:
        num_dense = int(data["num_dense"]) if "num_dense" in data else len(read_metadata(config.data).dense_fields)
    built = build_training(config, data["vocab_sizes"], num_dense=num_dense, ctx=ctx, local_batch=local_batch)
    return RunModel(run.path, record, config, built, ctx)


def evaluate_run(run_dir: Path, data_dir: str, split: str = "test", device: str = "auto") -> Dict[str, Any]:
    """Evaluates the best checkpoint of a run on (another conversion of) data with the same vocabulary.

    Raises:
        ValueError: not a run directory, no checkpoint, or data whose vocabulary fingerprint differs.
    """
    run = model_for_run(run_dir, device=device)
    meta = read_metadata(data_dir)
    run.check_data(meta, data_dir)
    run.load()
    result = run.evaluate(data_dir, split)
    return {f"{split}_{k}": v for k, v in result.items()}
