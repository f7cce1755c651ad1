"""The distributed trainer: DMP over a ``multiembed.models`` model, TorchRec's sparse-dist pipeline, early stopping
on validation AUC, DCP checkpoints, and a run directory that records everything needed to reproduce a result.

One process is one rank: started alone it is a one-rank job; started by torchrun / torchx it joins the job. The
run directory (shared by all ranks) holds::

    config.json       every option plus provenance (versions, git commit, plan, seeds, data fingerprint)
    plan.txt          the sharding plan, as printed at start
    metrics.jsonl     one line per evaluation
    summary.json      the final result (test metrics of the best-validation checkpoint)
    checkpoints/      DCP checkpoints (see training/checkpoint.py)

Training runs in *segments* that end at every evaluation and every checkpoint: each segment feeds the pipeline a
fresh iterator over ``[start, stop)`` batches of the epoch and the pipeline drains at its end, so the position
saved in a checkpoint is exactly what training consumed, never what the pipeline prefetched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from multiembed.data.stack import installed_versions, require_torchrec_stack

require_torchrec_stack()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchrec.distributed import DistributedModelParallel  # noqa: E402
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from multiembed.data.loader import ParquetBatchLoader  # noqa: E402
from multiembed.data.metadata import DatasetMetadata, atomic_write_text, read_metadata  # noqa: E402
from multiembed.models import MultiEmbeddingTrain, build_model  # noqa: E402
from multiembed.collapse import collapse_from_model, summarize_sets  # noqa: E402
from multiembed.sharding import format_plan, make_sharders, plan_sharding, plan_summary  # noqa: E402
from multiembed.training import checkpoint as ckpt  # noqa: E402
from multiembed.training.distributed import DistContext, init_distributed  # noqa: E402
from multiembed.training.metrics import EvalMetrics  # noqa: E402
from multiembed.training.optim import OptimizerConfig, attach_sparse_optimizer, build_optimizer  # noqa: E402

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
PLAN_FILE = "plan.txt"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run (``multiembed train --help`` documents each one).

    ``batch_size`` is the global batch (the paper's 2048); each rank gets ``batch_size / world_size`` rows.
    ``None`` optimizer fields take the device's defaults (:class:`OptimizerConfig`).
    """

    data: str
    model: str
    out: str
    epochs: int = 10
    batch_size: int = 2048
    sparse_optimizer: Optional[str] = None
    sparse_lr: Optional[float] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    dense_optimizer: str = "adam"
    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0
    sharding: str = "auto"
    patience: int = 3
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 0
    checkpoint_every: int = 0
    ia_every: int = 1
    max_steps: int = 0
    hidden: int = 400
    dropout: float = 0.2
    layout: str = "fused"
    dense_features: bool = False
    spectral_reg: float = 0.0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "eval_every", "checkpoint_every", "ia_every", "max_steps", "warmup_steps",
                     "decay_start", "decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout: must be in [0, 1), got {self.dropout}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _package_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("multiembed")
    except Exception:  # noqa: BLE001 - provenance is best effort; a missing dist-info must not stop training
        return None


def _all_ranks_agree(flag: bool) -> bool:
    """True only when ``flag`` holds on every rank (a MIN all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _raise_collectively(error: Optional[str]) -> None:
    """Raises ``ValueError(error)`` on every rank when rank 0 found one (so no rank waits forever)."""
    box = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ValueError(box[0])


class Trainer:
    """Builds the sharded model, the pipeline and the loaders from a :class:`TrainConfig`, then trains.

    Args:
        config: the run's options.
        ctx: this process's place in the job (``init_distributed()`` when omitted).
        log: where rank-0 messages go (stderr by default).
        evaluate_only: build the model for :meth:`evaluate` only: no run directory is touched and no train
            split is needed.
    """

    def __init__(
        self, config: TrainConfig, ctx: Optional[DistContext] = None, log: Any = None, evaluate_only: bool = False
    ) -> None:
        config.validate()
        self.config = config
        self.ctx = ctx or init_distributed(config.device)
        self._log_stream = log if log is not None else sys.stderr
        self.run_dir = Path(config.out)
        self.meta: DatasetMetadata = read_metadata(config.data)
        for split in () if evaluate_only else ("train", "val", "test"):
            if self.meta.split_rows().get(split, 0) == 0:
                raise ValueError(f"{config.data}: split {split!r} has no rows; training needs train, val and test")
        if config.batch_size % self.ctx.world_size:
            raise ValueError(
                f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
                f"{self.ctx.world_size} ranks"
            )
        self.local_batch = config.batch_size // self.ctx.world_size
        self.optim_config = OptimizerConfig.for_device(
            self.ctx.device.type,
            sparse_optimizer=config.sparse_optimizer,
            sparse_lr=config.sparse_lr,
            lr=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            decay_start=config.decay_start,
            decay_steps=config.decay_steps,
            dense_optimizer=config.dense_optimizer,
        )
        if not evaluate_only:
            self._prepare_run_dir()
        torch.manual_seed(config.seed)

        self.model = build_model(
            config.model,
            self.meta.vocab_sizes,
            num_dense=len(self.meta.dense_fields) if config.dense_features else 0,
            device=torch.device("meta"),
            hidden=config.hidden,
            dropout=config.dropout,
            layout=config.layout,
        )
        train_module = MultiEmbeddingTrain(self.model, spectral_reg_weight=config.spectral_reg)
        attach_sparse_optimizer(self.model.sparse_arch.embedding_bag_collection, self.optim_config)
        pg = dist.group.WORLD
        self.plan = plan_sharding(
            train_module,
            config.sharding,
            world_size=self.ctx.world_size,
            local_world_size=self.ctx.local_world_size,
            device_type=self.ctx.device.type,
            set_width=self.model.sparse_arch.stored_set_dim,
            pg=pg,
            batch_size=self.local_batch,
        )
        report_options = dict(
            world_size=self.ctx.world_size, local_world_size=self.ctx.local_world_size,
            batch_size=self.local_batch, device_type=self.ctx.device.type,
        )
        self.plan_text = format_plan(self.plan, train_module, **report_options)
        self.plan_json = plan_summary(self.plan, train_module, **report_options)
        self.dmp = DistributedModelParallel(
            train_module,
            device=self.ctx.device,
            plan=self.plan,
            sharders=make_sharders(device_type=self.ctx.device.type),
        )
        self.optimizer, self._schedules = build_optimizer(self.dmp, self.dmp.fused_optimizer, self.optim_config)
        self.pipeline = TrainPipelineSparseDist(
            self.dmp, self.optimizer, self.ctx.device, custom_model_fwd=self._forward_with_weights
        )
        self.progress: Dict[str, Any] = {
            "epoch": 0, "batch": 0, "step": 0, "best_auc": -1.0, "best_step": -1, "evals_since_best": 0,
            "evaluations": 0, "train_time_s": 0.0, "samples_trained": 0, "done": False,
        }
        if evaluate_only:
            return
        self.train_loader = ParquetBatchLoader(
            config.data, "train", self.local_batch, rank=self.ctx.rank, world_size=self.ctx.world_size,
            shuffle=True, seed=config.seed, last_batch="drop", use_dense=config.dense_features,
        )
        if self.train_loader.num_batches == 0:
            raise ValueError(
                f"{config.data}: the train split has too few rows for one global batch of {config.batch_size}"
            )
        self._log(f"sharding plan ({config.sharding}, {self.ctx.world_size} ranks, {self.ctx.backend}):\n{self.plan_text}")

    # ----------------------------------------------------------------------------------------------- set-up
    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            print(message, file=self._log_stream, flush=True)

    def _prepare_run_dir(self) -> None:
        error: Optional[str] = None
        if self.ctx.is_main:
            exists = self.run_dir.exists() and any(self.run_dir.iterdir()) if self.run_dir.is_dir() else self.run_dir.exists()
            if self.run_dir.exists() and not self.run_dir.is_dir():
                error = f"--out {self.run_dir}: exists and is not a directory"
            elif exists and self.config.overwrite:
                shutil.rmtree(self.run_dir)
            elif exists and self.config.resume:
                error = self._check_resumable()
            elif exists:
                error = f"--out {self.run_dir}: exists; pass --resume to continue that run or --overwrite to replace it"
            if error is None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
        _raise_collectively(error)

    def _check_resumable(self) -> Optional[str]:
        path = self.run_dir / CONFIG_FILE
        if not path.is_file():
            return f"--resume: {path} is missing; {self.run_dir} is not a multiembed run directory"
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))["options"]
        except (OSError, ValueError, KeyError) as e:
            return f"--resume: {path} is unreadable ({e})"
        for key in ("model", "batch_size", "seed", "layout", "hidden", "dense_features"):
            if previous.get(key) != getattr(self.config, key):
                return (
                    f"--resume: --{key.replace('_', '-')} is {getattr(self.config, key)!r} but the run in "
                    f"{self.run_dir} used {previous.get(key)!r}"
                )
        return None

    def _forward_with_weights(self, batch: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        loss, (loss_detached, logits, labels) = self.dmp(batch)
        return loss, (loss_detached, logits, labels, batch.weights)

    def _write_config(self) -> None:
        if not self.ctx.is_main:
            return
        record = {
            "options": dataclasses.asdict(self.config),
            "optimizer": dataclasses.asdict(self.optim_config),
            "provenance": {
                "multiembed": _package_version(),
                "git_commit": _git_commit(),
                "versions": installed_versions(),
                "python": sys.version.split()[0],
                "backend": self.ctx.backend,
                "world_size": self.ctx.world_size,
                "local_world_size": self.ctx.local_world_size,
                "device": str(self.ctx.device),
            },
            "data": {
                "dir": str(Path(self.config.data).resolve()),
                "dataset": self.meta.dataset,
                "vocab_fingerprint": self.meta.vocab_fingerprint,
                "vocab_sizes": self.meta.vocab_sizes,
                "rows": self.meta.split_rows(),
            },
            "model": {
                "name": self.config.model,
                "embedding_params": int(self.model.embedding_params),
                "dense_params": int(self.model.dense_params),
                "embedding_bytes": int(self.model.embedding_bytes),
            },
            "sharding": self.plan_json,
        }
        atomic_write_text(self.run_dir / CONFIG_FILE, json.dumps(record, indent=2, default=str) + "\n")
        atomic_write_text(self.run_dir / PLAN_FILE, self.plan_text + "\n")

    # ------------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> Dict[str, Any]:
        return {
            "model": self.dmp.state_dict(),
            "optim": self.optimizer.state_dict(),
            "progress": {k: torch.tensor(float(v)) for k, v in self.progress.items()},
            f"rank{self.ctx.rank}": {"rng": ckpt.rng_state()},
        }

    def _average_batch_norm_statistics(self) -> None:
        """Makes every rank's BatchNorm running statistics the mean over ranks.

        TorchRec wraps the dense part in DDP with ``broadcast_buffers=False``, so each rank's running statistics
        follow its own batches. Left alone, ranks would evaluate slightly different models, and a checkpoint
        (DCP keeps one copy of a key every rank saves) would hold one rank's statistics, so a resumed run would
        evaluate differently from an uninterrupted one. Averaging before every evaluation and checkpoint gives
        one model everywhere, the statistics of all ranks' batches, and exact resumes.
        """
        if self.ctx.world_size == 1:
            return
        for module in self.dmp.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                for statistic in (module.running_mean, module.running_var):
                    dist.all_reduce(statistic)
                    statistic.div_(self.ctx.world_size)

    @staticmethod
    def _weights_are_finite(model_state: Dict[str, Any]) -> bool:
        """Whether every weight of ``model_state`` this rank holds (its table shards included) is finite, on every
        rank.

        A segment's loss is computed before its last update, so a finite loss does not prove finite weights; this
        keeps a non-finite model out of the checkpoints.
        """
        finite = True
        for value in model_state.values():
            shards = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
            for tensor in shards:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    finite = finite and bool(torch.isfinite(tensor).all())
        return _all_ranks_agree(finite)

    def save(self) -> Path:
        self._average_batch_norm_statistics()
        state = self._state()
        if not self._weights_are_finite(state["model"]):
            raise TrainingDiverged(
                f"model weights became NaN or infinite by step {self.progress['step']}; not checkpointed: the last "
                f"good checkpoint is kept in {self.run_dir / ckpt.CHECKPOINT_DIR}. Lower --lr / --sparse-lr."
            )
        info = {k: v for k, v in self.progress.items()}
        path = ckpt.save_checkpoint(self.run_dir, int(self.progress["step"]), state, info)
        keep = [path]
        if self.progress["best_step"] >= 0:
            keep.append(self.run_dir / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(int(self.progress["best_step"])))
        ckpt.prune_checkpoints(self.run_dir, keep)
        dist.barrier()
        return path

    def restore(self, path: Path) -> None:
        """Loads model, optimizer state, schedule, data position and this rank's RNG from a checkpoint."""
        self.optimizer.init_state()
        state = self._state()
        ckpt.load_checkpoint(path, state)
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        for sched in self._schedules:
            sched.post_load_state_dict()
        for key, value in state["progress"].items():
            kind = type(self.progress[key])
            self.progress[key] = kind(value.item()) if kind is not bool else bool(value.item())
        ckpt.set_rng_state(state[f"rank{self.ctx.rank}"]["rng"])
        self._truncate_metrics_log(int(self.progress["evaluations"]))
        self._log(f"resumed from {path} (epoch {self.progress['epoch']}, batch {self.progress['batch']}, step {self.progress['step']})")

    def _truncate_metrics_log(self, evaluations: int) -> None:
        """Keeps the first ``evaluations`` lines of ``metrics.jsonl``: a run killed after an evaluation but before
        its checkpoint logged an evaluation the resumed run repeats."""
        path = self.run_dir / METRICS_FILE
        if not self.ctx.is_main or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if len(lines) > evaluations:
            atomic_write_text(path, "".join(lines[:evaluations]))
            self._log(f"{path}: dropped {len(lines) - evaluations} evaluation(s) logged after the checkpoint")

    def load_model_only(self, path: Path) -> None:
        state = {"model": self.dmp.state_dict()}
        ckpt.load_checkpoint(path, state)
        self.dmp.load_state_dict(state["model"])

    # ---------------------------------------------------------------------------------------------- loops
    def _segment_end(self, start: int) -> int:
        """The batch index (exclusive) where the segment starting at ``start`` ends."""
        stop = self.train_loader.num_batches
        step = int(self.progress["step"])
        for every in (self.config.eval_every, self.config.checkpoint_every):
            if every:
                stop = min(stop, start + every - (step % every))
        if self.config.max_steps:
            stop = min(stop, start + self.config.max_steps - step)
        return stop

    def _train_segment(self, epoch: int, start: int, stop: int) -> float:
        """Trains batches ``[start, stop)`` of ``epoch``; returns the mean loss of this rank."""
        self.dmp.train()
        batches: Iterator[Any] = islice(self.train_loader.iter_epoch(epoch, start_batch=start), stop - start)
        bar = tqdm(
            total=stop - start, desc=f"epoch {epoch}", unit="batch", file=sys.stderr, leave=False,
            disable=not (self.config.progress and self.ctx.is_main), dynamic_ncols=True,
        )
        loss_sum, steps, running = 0.0, 0, None
        started = time.perf_counter()
        with bar:
            while True:
                try:
                    loss, _, _, _ = self.pipeline.progress(batches)
                except StopIteration:
                    break
                value = float(loss)
                loss_sum += value
                steps += 1
                running = value if running is None else 0.98 * running + 0.02 * value
                if bar.disable is False:
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(
                        loss=f"{running:.4f}", samples_s=f"{steps * self.config.batch_size / max(elapsed, 1e-9):,.0f}"
                    )
                    bar.update(1)
        elapsed = time.perf_counter() - started
        if steps != stop - start:
            raise RuntimeError(f"the pipeline ran {steps} batches of the {stop - start} it was given")
        self.progress["train_time_s"] += elapsed
        self.progress["samples_trained"] += steps * self.config.batch_size
        self.progress["step"] += steps
        self.progress["batch"] = stop
        mean = loss_sum / max(steps, 1)
        if not _all_ranks_agree(math.isfinite(mean)):
            raise TrainingDiverged(
                f"training loss is NaN or infinite at step {self.progress['step']} (epoch {epoch}); "
                f"the last good checkpoint is kept in {self.run_dir / ckpt.CHECKPOINT_DIR}. "
                "Lower --lr / --sparse-lr or check the data."
            )
        return mean

    def evaluate(self, split: str, data_dir: Optional[str] = None) -> Dict[str, float]:
        """Evaluates every row of ``split`` exactly once over all ranks (a collective)."""
        self._average_batch_norm_statistics()
        loader = ParquetBatchLoader(
            data_dir or self.config.data, split, self.local_batch, rank=self.ctx.rank,
            world_size=self.ctx.world_size, shuffle=False, last_batch="pad", use_dense=self.config.dense_features,
        )
        metrics = EvalMetrics(
            rows_per_rank=loader.num_batches * self.local_batch, batch_size=self.local_batch,
            world_size=self.ctx.world_size, rank=self.ctx.rank, device=self.ctx.device,
        )
        self.dmp.eval()
        batches = iter(loader)
        with torch.no_grad():
            while True:
                try:
                    _, logits, labels, weights = self.pipeline.progress(batches)
                except StopIteration:
                    break
                metrics.update(logits, labels, weights)
        self.dmp.train()
        return metrics.compute()

    def information_abundance(self) -> Dict[str, Any]:
        """IA per set of the tables as they are now (row-normalised), mean and min over fields (a collective).

        Streams each rank's own shards into ``d x d`` Gram matrices (models/collapse.py), so no table is gathered.
        """
        result = collapse_from_model(self.dmp, sub_embedding=False, concat=False, random_init_seed=None)
        per_set = summarize_sets(result.sets)
        return {
            "ia_mean": [s["mean"] for s in per_set],
            "ia_min": [s["min"] for s in per_set],
            "ia_row_normalized": result.row_normalized,
        }

    def _append_metrics(self, record: Dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate_and_checkpoint(self, train_loss: float) -> bool:
        """Validation, early-stopping bookkeeping and a checkpoint; returns True when training should stop."""
        val = self.evaluate("val")
        self.progress["evaluations"] += 1
        improved = val["auc"] > self.progress["best_auc"]
        if improved:
            self.progress["best_auc"] = val["auc"]
            self.progress["best_step"] = self.progress["step"]
            self.progress["evals_since_best"] = 0
        else:
            self.progress["evals_since_best"] += 1
        stop = self.config.patience > 0 and self.progress["evals_since_best"] >= self.config.patience
        throughput = self.progress["samples_trained"] / max(self.progress["train_time_s"], 1e-9)
        every = self.config.ia_every
        collapse = self.information_abundance() if every and self.progress["evaluations"] % every == 0 else {}
        self._append_metrics(
            {
                "evaluation": int(self.progress["evaluations"]),
                "epoch": int(self.progress["epoch"]),
                "step": int(self.progress["step"]),
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in val.items()},
                "best_val_auc": self.progress["best_auc"],
                "samples_per_s": throughput,
                "lr": self._schedules[1].param_groups[0]["lr"],
                "sparse_lr": self._schedules[0].param_groups[0]["lr"] if self._schedules[0].param_groups else None,
                **collapse,
            }
        )
        self._log(
            f"step {self.progress['step']:>7} epoch {self.progress['epoch']}: val auc {val['auc']:.5f} "
            f"logloss {val['logloss']:.5f} ne {val['ne']:.4f} {'(best)' if improved else ''} "
            f"| {throughput:,.0f} samples/s"
            + (f" | IA mean per set {' '.join(f'{v:.2f}' for v in collapse['ia_mean'])}" if collapse else "")
        )
        return stop

    def fit(self) -> Dict[str, Any]:
        """Trains to early stopping or ``--epochs``, then tests the best-validation checkpoint.

        Returns:
            The summary written to ``summary.json``.
        """
        if self.config.resume:
            found = ckpt.newest_valid_checkpoint(self.run_dir, report=self._log)
            if found is not None:
                self.restore(found)
            else:
                self._log(f"--resume: no complete checkpoint in {self.run_dir}; starting from the beginning")
        self._write_config()
        cfg = self.config
        while not self.progress["done"]:
            epoch, start = int(self.progress["epoch"]), int(self.progress["batch"])
            stop = self._segment_end(start)
            loss = self._train_segment(epoch, start, stop) if stop > start else float("nan")
            epoch_done = self.progress["batch"] >= self.train_loader.num_batches
            at_step_limit = bool(cfg.max_steps) and self.progress["step"] >= cfg.max_steps
            step = int(self.progress["step"])
            eval_due = (epoch_done and not cfg.eval_every) or (cfg.eval_every and step % cfg.eval_every == 0)
            eval_due = bool(eval_due or at_step_limit or (epoch_done and epoch + 1 >= cfg.epochs))
            stop_training = self._evaluate_and_checkpoint(loss) if eval_due else False
            if epoch_done:
                self.progress["epoch"] = epoch + 1
                self.progress["batch"] = 0
            if stop_training or at_step_limit or self.progress["epoch"] >= cfg.epochs:
                self.progress["done"] = True
            if eval_due or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or self.progress["done"]:
                self.save()
        return self._finish()

    def _finish(self) -> Dict[str, Any]:
        best = self.run_dir / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(int(self.progress["best_step"]))
        self.load_model_only(best)
        val = self.evaluate("val")
        test = self.evaluate("test")
        samples_per_s = self.progress["samples_trained"] / max(self.progress["train_time_s"], 1e-9)
        summary: Dict[str, Any] = {
            "model": self.config.model,
            "best_step": int(self.progress["best_step"]),
            "steps": int(self.progress["step"]),
            "epochs_run": round(self.progress["step"] / self.train_loader.num_batches, 3),
            **{f"val_{k}": v for k, v in val.items()},
            **{f"test_{k}": v for k, v in test.items()},
            "samples_per_s": samples_per_s,
            "world_size": self.ctx.world_size,
            "embedding_params": int(self.model.embedding_params),
            "dense_params": int(self.model.dense_params),
            "checkpoint": str(best),
        }
        if self.meta.bayes:
            for split in ("val", "test"):
                if split in self.meta.bayes:
                    summary[f"bayes_{split}_auc"] = self.meta.bayes[split]["auc"]
                    summary[f"bayes_{split}_logloss"] = self.meta.bayes[split]["logloss"]
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary


def train(config: TrainConfig) -> Dict[str, Any]:
    """Runs one training job in this process (one rank of it under torchrun / torchx)."""
    return Trainer(config).fit()


def load_run_config(run_dir: Path) -> Dict[str, Any]:
    """The ``config.json`` of a run directory, with a clear error when it is not one."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: not a multiembed run directory ({CONFIG_FILE} missing)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ``summary.json`` names, else the newest valid one."""
    summary = Path(run_dir) / SUMMARY_FILE
    if summary.is_file():
        path = Path(json.loads(summary.read_text(encoding="utf-8"))["checkpoint"])
        if not path.is_absolute():
            path = Path(run_dir) / path
        ckpt.verify_checkpoint(path)
        return path
    found = ckpt.newest_valid_checkpoint(Path(run_dir))
    if found is None:
        raise ValueError(f"{run_dir}: no complete checkpoint to evaluate")
    return found


def trainer_for_run(
    run_dir: Path, data_dir: Optional[str] = None, device: str = "auto", ctx: Optional[DistContext] = None
) -> Trainer:
    """The model of a finished (or running) run, rebuilt from its ``config.json`` and sharded, weights not loaded.

    Args:
        run_dir: the run directory.
        data_dir: a dataset to read instead of the one the run recorded (another conversion, or data that moved);
            its vocabulary fingerprint must equal the run's.
        device: ``auto``, ``cpu`` or ``cuda``.
        ctx: this process's place in the job (``init_distributed()`` when omitted).

    Raises:
        ValueError: not a run directory, an unreadable dataset, or a vocabulary that differs from the run's.
    """
    record = load_run_config(run_dir)
    options = dict(record["options"])
    data_dir = str(data_dir) if data_dir is not None else options["data"]
    meta = read_metadata(data_dir)
    trained_on = record.get("data", {}).get("vocab_fingerprint")
    if trained_on and meta.vocab_fingerprint != trained_on:
        raise ValueError(
            f"{data_dir}: vocabulary fingerprint {meta.vocab_fingerprint[:16]}... differs from the run's "
            f"({trained_on[:16]}...) in {Path(run_dir) / CONFIG_FILE}; convert the data with --vocab-from the "
            "training data's directory"
        )
    options.update(data=data_dir, resume=False, overwrite=False, progress=False, device=device)
    return Trainer(TrainConfig(**options), ctx=ctx, evaluate_only=True)


def evaluate_run(run_dir: Path, data_dir: str, split: str = "test", device: str = "auto") -> Dict[str, Any]:
    """Evaluates the best checkpoint of a run on (another conversion of) data with the same vocabulary.

    Raises:
        ValueError: not a run directory, no checkpoint, or data whose vocabulary fingerprint differs.
    """
    trainer = trainer_for_run(run_dir, data_dir, device=device)
    if trainer.meta.split_rows().get(split, 0) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no rows")
    trainer.load_model_only(best_checkpoint(run_dir))
    result = trainer.evaluate(split, data_dir=data_dir)
    return {f"{split}_{k}": v for k, v in result.items()}


def format_summary(summary: Dict[str, Any], run_dir: Path) -> str:
    """The final table ``multiembed train`` prints: model metrics next to the Bayes-optimal ones when known."""
    rows: List[Tuple[str, str, str]] = []
    for split in ("val", "test"):
        bayes = summary.get(f"bayes_{split}_auc")
        rows.append((f"{split} AUC", f"{summary[f'{split}_auc']:.5f}", f"{bayes:.5f}" if bayes is not None else "-"))
        bayes_ll = summary.get(f"bayes_{split}_logloss")
        rows.append(
            (f"{split} log loss", f"{summary[f'{split}_logloss']:.5f}", f"{bayes_ll:.5f}" if bayes_ll is not None else "-")
        )
        rows.append((f"{split} NE", f"{summary[f'{split}_ne']:.5f}", "-"))
    rows.append(("train samples/s (all ranks)", f"{summary['samples_per_s']:,.0f}", "-"))
    rows.append(("embedding params (logical)", f"{summary['embedding_params']:,}", "-"))
    rows.append(("dense params", f"{summary['dense_params']:,}", "-"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'model':>14}  {'Bayes-optimal':>14}", "-" * (width + 32)]
    lines += [f"{name:<{width}}  {value:>14}  {bayes:>14}" for name, value, bayes in rows]
    lines.append(f"run directory: {run_dir}  (best checkpoint at step {summary['best_step']})")
    return "\n".join(lines)
