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

import torch
import torch.distributed as dist

from multiembed.runtime.stack import private_api_error

try:  # DCP's own (un)flattening of nested state, so keys match the checkpoint's exactly (no public equivalent)
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
except ImportError as e:  # pragma: no cover - depends on the installed torch
    raise private_api_error("torch.distributed.checkpoint._nested_dict", e) from e

from multiembed.collapse import collapse_from_model, summarize_sets
from multiembed.collapse.monitor import CollapsedField, CollapseMonitor, format_collapsed
from multiembed.config import MODEL_OPTIONS, OutputBias, TrainConfig, recorded_option
from multiembed.data.loader import ParquetBatchLoader, positive_rate
from multiembed.runtime.locking import LOCK_FILE, exclusive_lock
from multiembed.data.metadata import DatasetMetadata, atomic_write_text, read_metadata, split_identity
from multiembed.data.paths import is_within
from multiembed.runtime.stack import installed_versions
from multiembed.sharding.report import format_brief
from multiembed.training import checkpoint as ckpt
from multiembed.training.distributed import DistContext, init_distributed
from multiembed.training.resume import describe, match_saved_state
from multiembed.training.evaluation import (
    CONFIG_FILE,
    SUMMARY_FILE,
    average_batch_norm_statistics,
    build_for_data,
    evaluate_split,
    load_model_weights,
)
from multiembed.training.progress import progress_bar

METRICS_FILE = "metrics.jsonl"
PLAN_FILE = "plan.txt"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def prior_logit(positives: int, rows: int) -> float:
    """The log-odds of the positive rate, ``log((positives + 1/2) / (rows - positives + 1/2))``: each count gets half
    an observation (the Krichevsky-Trofimov estimate), so a split with no positives (or no negatives) still gives a
    finite bias; on a split of n rows it differs from the plain log-odds by O(1/n).

    Example::

        >>> round(prior_logit(220, 1000), 4), round(prior_logit(0, 1000), 2)
        (-1.264, -7.6)
    """
    if not 0 <= positives <= rows:
        raise ValueError(f"prior_logit: positives must be in [0, rows={rows}], got {positives}")
    return math.log((positives + 0.5) / (rows - positives + 0.5))


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


def _size_of(value: Any) -> Optional[Tuple[int, ...]]:
    """The global size of a tensor, sharded tensor or DTensor in a state dict; None for other values and for the
    empty placeholders TorchRec keeps on ranks that hold no shard of a table's state (nothing is loaded into them)."""
    if isinstance(value, torch.Tensor) or hasattr(value, "local_shards"):
        size = tuple(value.size())
        return size if math.prod(size) > 0 else None
    return None


class LoaderWaitTimer:
    """An iterator over ``batches`` that adds up the seconds spent in ``next()``: how long the training step waited
    for the loader.

    Example::

        >>> timer = LoaderWaitTimer(iter(range(3)))
        >>> list(timer), timer.wait_s >= 0.0
        ([0, 1, 2], True)
    """

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches
        self.wait_s = 0.0

    def __iter__(self) -> "LoaderWaitTimer":
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.wait_s += time.perf_counter() - start


def _exact_tensor(value: Any) -> torch.Tensor:
    """A progress counter as a tensor that holds it exactly (int64 counts: float32 loses them past 2^24)."""
    if isinstance(value, bool) or isinstance(value, int):
        return torch.tensor(int(value), dtype=torch.int64)
    return torch.tensor(float(value), dtype=torch.float64)


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
    """Builds the sharded model (:mod:`multiembed.training.build`) and the loaders from a :class:`TrainConfig`,
    then trains.

    Args:
        config: the run's options.
        ctx: this process's place in the job (``init_distributed()`` when omitted).
        log: where rank-0 messages go (stderr by default).

    Example::

        trainer = Trainer(TrainConfig(data="runs/data/synth", model="dcnv2-me-4x", out="runs/me4x"))
        summary = trainer.fit()  # {"test_auc": ..., "best_step": ..., ...}
    """

    def __init__(self, config: TrainConfig, ctx: Optional[DistContext] = None, log: Any = None) -> None:
        config.validate()
        self.config = config
        self.ctx = ctx or init_distributed(config.device)
        self._log_stream = log if log is not None else sys.stderr
        self.run_dir = Path(config.out)
        self.meta: DatasetMetadata = read_metadata(config.data)
        for split in ("train", "val", "test"):
            if self.meta.split_rows().get(split, 0) == 0:
                raise ValueError(f"{config.data}: split {split!r} has no rows; training needs train, val and test")
        if config.batch_size % self.ctx.world_size:
            raise ValueError(
                f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
                f"{self.ctx.world_size} ranks"
            )
        self.local_batch = config.batch_size // self.ctx.world_size
        self._prepare_run_dir()
        self.built = build_for_data(config, self.meta, self.ctx, self.local_batch)
        self.dmp = self.built.dmp
        self.optimizer = self.built.optimizer
        self.pipeline = self.built.pipeline
        self._schedules = self.built.schedules
        self.optim_config = self.built.optim_config
        self.model = self.built.planned.model
        self.plan = self.built.planned.plan
        self.plan_text = self.built.planned.text
        self.plan_json = self.built.planned.summary
        self.output_bias_init = self._init_output_bias()
        self.progress: Dict[str, Any] = {
            "epoch": 0, "batch": 0, "step": 0, "best_auc": -1.0, "best_step": -1, "evals_since_best": 0,
            "evaluations": 0, "train_time_s": 0.0, "samples_trained": 0, "done": False,
        }
        # Seconds this process waited for the loader's next batch, and the wall time of its training segments
        # (loader_share); not checkpointed.
        self.loader_wait_s = 0.0
        self.train_wall_s = 0.0
        # Fields whose IA fell below --collapse-warn x a random initialisation's (collapse/monitor.py).
        self.collapse_monitor = CollapseMonitor(config.collapse_warn)
        self.train_loader = ParquetBatchLoader(
            config.data, "train", self.local_batch, rank=self.ctx.rank, world_size=self.ctx.world_size,
            shuffle=True, seed=config.seed, last_batch="drop", use_dense=config.dense_features,
        )
        if self.train_loader.num_batches == 0:
            raise ValueError(
                f"{config.data}: the train split has too few rows for one global batch of {config.batch_size}"
            )
        # The console gets the plan in brief (one line per table is 39 lines for Criteo); plan.txt has every table.
        self._log(
            f"sharding plan ({config.sharding}, {self.ctx.world_size} ranks, {self.ctx.backend}; every table in "
            f"{self.run_dir / PLAN_FILE}):\n{format_brief(self.plan_json)}"
        )

    # ----------------------------------------------------------------------------------------------- set-up
    def _init_output_bias(self) -> Optional[Dict[str, Any]]:
        """``--output-bias prior`` (the default): sets the logit's constant term to :func:`prior_logit` of the train
        split's labels (every rank reads the same labels, so the replicas stay equal; a resumed run's checkpoint then
        replaces it). Returns what was set, for ``config.json`` (None with ``--output-bias default``)."""
        if self.config.output_bias != OutputBias.PRIOR.value:
            return None
        rate, rows = positive_rate(self.config.data, self.meta, "train")
        logit = prior_logit(round(rate * rows), rows)
        self.built.model.set_output_bias(logit)
        self._log(f"output bias: log-odds of the train split's positive rate {rate:.4f} ({rows} rows) = {logit:.4f}")
        return {"positive_rate": rate, "rows": rows, "logit": logit}

    def _keep_recorded_output_bias(self) -> None:
        """After a restore the logit's bias is the checkpoint's: ``config.json`` keeps how the run started (its
        recorded ``--output-bias`` and ``output_bias_init``; a run that predates the option started at ``default``)
        rather than this invocation's option, which changed nothing (rank 0, the writer of ``config.json``)."""
        if not self.ctx.is_main:
            return
        record = json.loads((self.run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        started_with = recorded_option(record["options"], "output_bias")
        if started_with != self.config.output_bias:
            self._log(f"--resume: the run started with --output-bias {started_with} ({self.run_dir / CONFIG_FILE}); "
                      f"its bias is the checkpoint's, --output-bias {self.config.output_bias} is not applied")
        self.config = dataclasses.replace(self.config, output_bias=started_with)
        self.output_bias_init = record.get("output_bias_init")

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            print(message, file=self._log_stream, flush=True)

    def _prepare_run_dir(self) -> None:
        """Checks ``--out`` (rank 0), takes the job's lock on it and, with ``--overwrite``, empties it.

        The lock (:func:`~multiembed.runtime.locking.exclusive_lock`, held by rank 0 for the job, released by
        :meth:`close` or when the process ends) refuses a second job on the same directory in one line.
        """
        error: Optional[str] = None
        if self.ctx.is_main:
            error = self._run_dir_problem()
            if error is None:
                try:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    self._lock = exclusive_lock(self.run_dir, "training run")
                    lock_file = self._lock.__enter__()
                except OSError as e:
                    self._lock = None
                    error = str(e)
                else:
                    if self.config.overwrite:
                        # Only the run's own entries go; the lock file stays (the directory is a run: checked).
                        for entry in self.run_dir.iterdir():
                            if entry == lock_file:
                                continue
                            if entry.is_dir() and not entry.is_symlink():
                                shutil.rmtree(entry)
                            else:
                                entry.unlink()
        _raise_collectively(error)

    def close(self) -> None:
        """Releases the run directory's lock (rank 0); :meth:`fit` calls it when it ends."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.__exit__(None, None, None)

    def _run_dir_problem(self) -> Optional[str]:
        """Why ``--out`` cannot be used as asked (None: it can); nothing is touched here."""
        out = self.run_dir
        if out.is_symlink():
            return f"--out {out}: is a symbolic link; give the directory it points to"
        if out.exists() and not out.is_dir():
            return f"--out {out}: exists and is not a directory"
        if is_within(out, self.config.data):
            return (
                f"--out {out}: is the --data directory {self.config.data} or inside it; a run never writes into its "
                "dataset"
            )
        if not out.exists() or not any(p.name != LOCK_FILE for p in out.iterdir()):
            return None
        for name in (CONFIG_FILE, SUMMARY_FILE, METRICS_FILE, PLAN_FILE, ckpt.CHECKPOINT_DIR):
            if (out / name).is_symlink():
                return f"--out {out}: {out / name} is a symbolic link; refusing to write through it"
        if self.config.overwrite:
            if not (out / CONFIG_FILE).is_file():
                return (
                    f"--overwrite: {out} is not a multiembed run directory ({CONFIG_FILE} missing); refusing to "
                    "delete it"
                )
            if is_within(self.config.data, out):
                return f"--overwrite: {out} holds the --data directory {self.config.data}; refusing to delete it"
            return None
        if self.config.resume:
            return self._check_resumable()
        return f"--out {out}: exists; pass --resume to continue that run or --overwrite to replace it"

    def _check_resumable(self) -> Optional[str]:
        path = self.run_dir / CONFIG_FILE
        if not path.is_file():
            return f"--resume: {path} is missing; {self.run_dir} is not a multiembed run directory"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            previous = record["options"]
        except (OSError, ValueError, KeyError) as e:
            return f"--resume: {path} is unreadable ({e})"
        for key in (*MODEL_OPTIONS, "batch_size", "seed"):
            if recorded_option(previous, key) != getattr(self.config, key):
                return (
                    f"--resume: --{key.replace('_', '-')} is {getattr(self.config, key)!r} but the run in "
                    f"{self.run_dir} used {recorded_option(previous, key)!r}"
                )
        trained_on = record.get("data", {}).get("vocab_fingerprint")
        if trained_on is not None and trained_on != self.meta.vocab_fingerprint:
            return (
                f"--resume: --data {self.config.data} has vocabulary fingerprint {self.meta.vocab_fingerprint[:16]}... "
                f"but the run in {self.run_dir} was trained on {trained_on[:16]}... ({path})"
            )
        trained_split = record.get("data", {}).get("split_identity")
        current_split = split_identity(self.meta)
        if trained_split is not None and current_split is not None and trained_split != current_split:
            return (
                f"--resume: --data {self.config.data} has split identity {current_split[:16]}... but the run in "
                f"{self.run_dir} was trained on {trained_split[:16]}... ({path})"
            )
        return None

    def _write_config(self) -> None:
        if not self.ctx.is_main:
            return
        record = {
            "options": dataclasses.asdict(self.config),
            "optimizer": dataclasses.asdict(self.optim_config),
            "output_bias_init": self.output_bias_init,
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
                "num_dense": len(self.meta.dense_fields),
                "split_identity": split_identity(self.meta),
                "split_recipe": self.meta.split_recipe,
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
            "progress": {k: _exact_tensor(v) for k, v in self.progress.items()},
            f"rank{self.ctx.rank}": {"rng": ckpt.rng_state()},
        }

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

    def _kept_checkpoint(self) -> str:
        """What a diverged run leaves behind, as it is."""
        kept = ckpt.newest_valid_checkpoint(self.run_dir, report=lambda _: None)
        if kept is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is kept: {kept}"

    def save(self) -> Path:
        average_batch_norm_statistics(self.dmp, self.ctx.world_size)
        state = self._state()
        if not self._weights_are_finite(state["model"]):
            raise TrainingDiverged(
                f"model weights became NaN or infinite by step {self.progress['step']}; not checkpointed; "
                f"{self._kept_checkpoint()}. Lower --lr / --sparse-lr."
            )
        info = {k: v for k, v in self.progress.items()}
        path = ckpt.save_checkpoint(self.run_dir, int(self.progress["step"]), state, info)
        keep = [path]
        if self.progress["best_step"] >= 0:
            keep.append(self.run_dir / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(int(self.progress["best_step"])))
        ckpt.prune_checkpoints(self.run_dir, keep)
        dist.barrier()
        return path

    def restore(self, path: Path, verb: str = "resumed from") -> None:
        """Loads model, optimizer state, schedule, data position and this rank's RNG from a checkpoint (``verb``
        starts the line logged).

        The checkpoint may come from another world size or sharding (:mod:`multiembed.training.resume`): tables and
        optimizer state are resharded by DCP, state kept by another optimizer implementation is translated where the
        update is the same, and ranks new to the job are seeded from ``(seed, step, rank)``.

        Raises:
            ValueError: state that cannot be converted exactly, or a corrupted / unsafe checkpoint (one line).
        """
        self.optimizer.init_state()
        state = self._state()
        flat, mapping = flatten_state_dict(state)
        sizes = {key: _size_of(value) for key, value in flat.items()}
        pairs, kept = match_saved_state(
            flat, ckpt.checkpoint_entries(path), sizes, sparse_optimizer=self.optim_config.sparse_optimizer,
            where=str(path),
        )
        loaded = {pairs[key]: flat[key] for key in pairs}
        ckpt.load_checkpoint(path, loaded)
        for key, saved_key in pairs.items():
            flat[key] = loaded[saved_key]
        state = unflatten_state_dict(flat, mapping)
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        for sched in self._schedules:
            sched.post_load_state_dict()
        for key, value in state["progress"].items():
            kind = type(self.progress[key])
            self.progress[key] = bool(value.item()) if kind is bool else kind(value.item())
        rank_key = f"rank{self.ctx.rank}"
        if any(key.startswith(rank_key + ".") for key in kept):
            torch.manual_seed(hash((self.config.seed, int(self.progress["step"]), self.ctx.rank)) & (2**63 - 1))
        else:
            ckpt.set_rng_state(state[rank_key]["rng"])
        # Options may extend a run (a larger --max-steps or --epochs): whether it is done follows from them.
        cfg = self.config
        self.progress["done"] = bool(
            (cfg.patience > 0 and self.progress["evals_since_best"] >= cfg.patience)
            or self.progress["epoch"] >= cfg.epochs
            or (cfg.max_steps and self.progress["step"] >= cfg.max_steps)
        )
        self._truncate_metrics_log(int(self.progress["evaluations"]))
        note = describe(kept)
        self._log(
            f"{verb} {path} (epoch {self.progress['epoch']}, batch {self.progress['batch']}, step "
            f"{self.progress['step']}) on {self.ctx.world_size} rank(s)" + (f"; {note}" if note else "")
        )

    def warm_start(self, path: Path) -> None:
        """Starts this run from the state another run of the same model and options ended with (the production
        loop's previous day, :mod:`multiembed.training.days`): tables, dense weights, optimizer state and RNG load as
        :meth:`restore` loads them (from any world size), while this run's progress (epoch, batch, step, best AUC,
        evaluations) starts at zero, so the run trains its own data from the beginning.

        Raises:
            ValueError: a checkpoint of another model or options, or one that cannot be converted exactly (one
                line).
        """
        start = dict(self.progress)
        self.restore(path, verb="warm-started from")
        self.progress.update(start)
        self._truncate_metrics_log(0)

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
        """Loads only the model's weights from a checkpoint (e.g. the best one, to test it)."""
        load_model_weights(self.built, path)

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
        batches = LoaderWaitTimer(islice(self.train_loader.iter_epoch(epoch, start_batch=start), stop - start))
        # Progress over the whole run (every epoch, or up to --max-steps), so a log gets about ten lines per run
        # rather than ten per segment; a bar on a terminal (training.progress).
        planned = self.config.epochs * self.train_loader.num_batches
        if self.config.max_steps:
            planned = min(planned, self.config.max_steps)
        step = int(self.progress["step"])
        bar = progress_bar(
            total=max(planned, step + stop - start), initial=step, desc=f"epoch {epoch}", unit="step",
            file=sys.stderr, leave=False, disable=not (self.config.progress and self.ctx.is_main), dynamic_ncols=True,
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
        # Not part of the checkpointed progress: wall-clock facts of this process only.
        self.loader_wait_s += batches.wait_s
        self.train_wall_s += elapsed
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
                f"{self._kept_checkpoint()}. Lower --lr / --sparse-lr or check the data."
            )
        return mean

    def evaluate(self, split: str) -> Dict[str, float]:
        """Evaluates every row of ``split`` of the run's data exactly once over all ranks (a collective)."""
        return evaluate_split(
            self.built, self.config.data, split, ctx=self.ctx, local_batch=self.local_batch,
            use_dense=self.config.dense_features,
        )

    def information_abundance(self) -> Dict[str, Any]:
        """IA per set of the tables as they are now (row-normalised), mean and min over fields (a collective), and
        the collapse monitor's fields (``collapsed``: IA per set or of the sets side by side below ``--collapse-warn``
        x the random-init IA of the same shape).

        Streams each rank's own shards into ``d x d`` Gram matrices (``multiembed.collapse``), so no table is gathered.
        """
        monitor = self.collapse_monitor
        result = collapse_from_model(self.dmp, sub_embedding=False, concat=monitor.enabled, random_init_seed=None)
        per_set = summarize_sets(result.sets)
        record: Dict[str, Any] = {
            "ia_mean": [s["mean"] for s in per_set],
            "ia_min": [s["min"] for s in per_set],
            "ia_row_normalized": result.row_normalized,
        }
        if monitor.enabled:
            record["collapse_warn"] = monitor.fraction
            record["collapsed"] = [entry.to_dict() for entry in monitor.check(result)]
        return record

    def _append_metrics(self, record: Dict[str, Any]) -> None:
        if self.ctx.is_main:
            path = self.run_dir / METRICS_FILE
            if path.is_symlink():
                raise ValueError(f"{path}: is a symbolic link; refusing to write through it")
            with open(path, "a", encoding="utf-8") as f:
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
                "loader_share": self.loader_share,
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
            + (f" | {_collapsed_text(collapse)}" if collapse.get("collapsed") else "")
        )
        return stop

    @property
    def loader_share(self) -> Optional[float]:
        """The share of this process's training time spent waiting for the loader's next batch (None before any
        step): the seconds inside ``next()`` on the batch iterator the pipeline pulls from, over the wall time of the
        training segments (steps included, evaluations and checkpoints not). The pipeline fetches batch ``i + 1``
        during step ``i``, so the wait is part of the step time it is divided by."""
        return self.loader_wait_s / self.train_wall_s if self.train_wall_s > 0 else None

    def fit(self) -> Dict[str, Any]:
        """Trains to early stopping or ``--epochs``, then tests the best-validation checkpoint.

        Returns:
            The summary written to ``summary.json``.
        """
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> Dict[str, Any]:
        if self.config.resume:
            found = ckpt.newest_valid_checkpoint(self.run_dir, report=self._log)
            if found is not None:
                self.restore(found)
                self._keep_recorded_output_bias()
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
            "loader_share": self.loader_share,
            "world_size": self.ctx.world_size,
            "embedding_params": int(self.model.embedding_params),
            "dense_params": int(self.model.dense_params),
            "checkpoint": best.relative_to(self.run_dir).as_posix(),
        }
        if self.meta.bayes:
            for split in ("val", "test"):
                if split in self.meta.bayes:
                    summary[f"bayes_{split}_auc"] = self.meta.bayes[split]["auc"]
                    summary[f"bayes_{split}_logloss"] = self.meta.bayes[split]["logloss"]
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary


def _collapsed_text(record: Dict[str, Any]) -> str:
    """The collapse monitor's fields of a metrics record, as one phrase for the progress line."""
    return format_collapsed([CollapsedField(**e) for e in record["collapsed"]], record["collapse_warn"])


def train(config: TrainConfig) -> Dict[str, Any]:
    """Runs one training job in this process (one rank of it under torchrun / torchx)."""
    return Trainer(config).fit()


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
