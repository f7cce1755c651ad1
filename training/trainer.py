"""The distributed trainer: DMP over a ``multiembed.models`` model, TorchRec's sparse-dist pipeline, early stopping
on validation AUC, DCP checkpoints, and a run directory (:mod:`multiembed.training.run_dir`) that records everything
needed to reproduce a result.

One process is one rank: started alone it is a one-rank job; started by torchrun / torchx it joins the job.

Training runs in *segments* that end at every evaluation and every checkpoint: each segment feeds the pipeline a
fresh iterator over ``[start, stop)`` batches of the epoch and the pipeline drains at its end, so the position
saved in a checkpoint is exactly what training consumed, never what the pipeline prefetched. What is due after a
segment (evaluate, checkpoint, stop) is decided by :class:`~multiembed.training.state.TrainingState`.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from multiembed.runtime.stack import private_api_error

try:  # DCP's own (un)flattening of nested state, so keys match the checkpoint's exactly (no public equivalent)
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
except ImportError as e:  # pragma: no cover - depends on the installed torch
    raise private_api_error("torch.distributed.checkpoint._nested_dict", e) from e

from multiembed.collapse import collapse_from_model, summarize_sets
from multiembed.collapse.monitor import CollapsedField, CollapseMonitor, format_collapsed
from multiembed.config import OutputBias, TrainConfig, recorded_option
from multiembed.data.sources import open_split, split_positive_rate
from multiembed.data.metadata import DatasetMetadata, read_metadata, split_identity
from multiembed.models import MultiEmbeddingModel
from multiembed.runtime.stack import installed_versions
from multiembed.sharding.report import format_brief
from multiembed.training import checkpoint as ckpt
from multiembed.sharding.managed import close_intervals
from multiembed.training.build import admit_for_data, build_for_data, is_managed
from multiembed.training.distributed import DistContext, all_ranks_agree, barrier, init_distributed
from multiembed.training.evaluation import average_batch_norm_statistics, evaluate_split, load_model_weights
from multiembed.training.managed import ManagedMonitor, check_same_world_size
from multiembed.training.progress import progress_bar
from multiembed.training.resume import describe, match_saved_state
from multiembed.training.run_dir import RunDir
from multiembed.training.state import TrainingState


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


class Trainer:
    """Builds the sharded model (:mod:`multiembed.training.build`) and the loaders from a :class:`TrainConfig`,
    then trains: a loop over segments whose progress is a :class:`~multiembed.training.state.TrainingState`, writing
    through the run directory's :class:`~multiembed.training.run_dir.RunDir`.

    Args:
        config: the run's options.
        ctx: this process's place in the job (``init_distributed()`` when omitted).
        log: where rank-0 messages go (stderr by default).
        extra_train: datasets of the same id space whose train splits are trained on with ``config.data``'s, as one
            shuffled split (retraining on several days of a log; recorded in ``config.json``); validation and test
            stay ``config.data``'s.

    Attributes:
        config: the run's options (after a resume, ``output_bias`` as the run started).
        ctx: this process's place in the job.
        run: the run directory's files (locked by rank 0 until :meth:`close`).
        meta: the training data's metadata.
        built: the sharded model, optimizer, schedules and pipeline (:class:`~multiembed.training.build.BuiltTraining`).
        state: where training stands (saved in every checkpoint).
        train_loader: this rank's loader over the train split.

    Example::

        trainer = Trainer(TrainConfig(data="runs/data/synth", model="dcnv2-me-4x", out="runs/me4x"))
        summary = trainer.fit()  # {"test_auc": ..., "best_step": ..., ...}
    """

    def __init__(
        self, config: TrainConfig, ctx: Optional[DistContext] = None, log: Any = None,
        extra_train: Sequence[str] = (),
    ) -> None:
        config.validate()
        self.config = config
        self.extra_train = [str(path) for path in extra_train]
        self.ctx = ctx or init_distributed(config.device)
        self._log_stream = log if log is not None else sys.stderr
        self.run = RunDir(config.out)
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
        # Admitted before the run directory is touched: a run refused for memory creates, locks or empties nothing.
        admission = admit_for_data(config, self.meta, self.ctx, self.local_batch)
        self.run.open(config, self.meta, self.ctx.is_main)
        try:
            self.built = build_for_data(config, self.meta, self.ctx, self.local_batch, admission)
        except BaseException:
            if self.ctx.is_main:
                self.run.abandon()
            raise
        self.output_bias_init = self._init_output_bias()
        # --vocab managed: the counters of the managed tables (fallback hits, rows in use, evictions).
        self.managed = ManagedMonitor(self.dmp) if is_managed(config) else None
        self.state = TrainingState()
        # Seconds this process waited for the loader's next batch, and the wall time of its training segments
        # (loader_share); not checkpointed.
        self.loader_wait_s = 0.0
        self.train_wall_s = 0.0
        # Fields whose IA fell below --collapse-warn x a random initialisation's (collapse/monitor.py).
        self.collapse_monitor = CollapseMonitor(config.collapse_warn)
        self.train_loader = open_split(
            config.data, "train", self.local_batch, rank=self.ctx.rank, world_size=self.ctx.world_size,
            shuffle=True, seed=config.seed, last_batch="drop", use_dense=config.dense_features,
            extra_data=self.extra_train,
        )
        if self.train_loader.num_batches == 0:
            raise ValueError(
                f"{config.data}: the train split has too few rows for one global batch of {config.batch_size}"
            )
        # The console gets the plan in brief (one line per table is 39 lines for Criteo); plan.txt has every table.
        self._log(
            f"sharding plan ({config.sharding}, {self.ctx.world_size} ranks, {self.ctx.backend}; every table in "
            f"{self.run.plan_file}):\n{format_brief(self.built.planned.summary)}"
        )

    @classmethod
    def for_run(
        cls, run_dir: Union[str, Path], ctx: Optional[DistContext] = None, log: Any = None, **overrides: Any
    ) -> "Trainer":
        """A trainer that continues the run in ``run_dir`` with the options its ``config.json`` recorded (an option
        the run predates: the behaviour it had), changed by ``overrides`` (``--resume`` unless they say otherwise).

        Options that extend the run (a larger ``epochs`` or ``max_steps``) continue it from its newest checkpoint;
        the checks of ``--resume`` apply (same model options, batch size, seed and data).

        Raises:
            ValueError: not a run directory, or options the run cannot continue with (one line).

        Example::

            summary = Trainer.for_run("runs/me4x", epochs=3).fit()
        """
        run = RunDir(run_dir)
        options: Dict[str, Any] = {"resume": True, "overwrite": False, **overrides, "out": str(run.path)}
        return cls(run.train_config(**options), ctx=ctx, log=log)

    @property
    def run_dir(self) -> Path:
        """The run directory (``--out``)."""
        return self.run.path

    @property
    def dmp(self) -> DistributedModelParallel:
        """The sharded training module (``DistributedModelParallel``)."""
        return self.built.dmp

    @property
    def model(self) -> MultiEmbeddingModel:
        """The zoo model as planned (``MultiEmbeddingModel``; :attr:`dmp` holds it with its tables sharded)."""
        return self.built.planned.model

    @property
    def pipeline(self) -> TrainPipelineSparseDist:
        """TorchRec's training pipeline over :attr:`dmp`."""
        return self.built.pipeline

    # ----------------------------------------------------------------------------------------------- set-up
    def _init_output_bias(self) -> Optional[Dict[str, Any]]:
        """``--output-bias prior`` (the default): sets the logit's constant term to :func:`prior_logit` of the train
        split's labels (every rank reads the same labels, so the replicas stay equal; a resumed run's checkpoint then
        replaces it). Returns what was set, for ``config.json`` (None with ``--output-bias default``)."""
        if self.config.output_bias != OutputBias.PRIOR.value:
            return None
        rate, rows = split_positive_rate(self.config.data, self.meta, "train")
        positives = round(rate * rows)
        for data in self.extra_train:  # the other days' train rows count as this split's
            data_rate, data_rows = split_positive_rate(data, read_metadata(data), "train")
            positives, rows = positives + round(data_rate * data_rows), rows + data_rows
            rate = positives / rows
        logit = prior_logit(positives, rows)
        self.built.model.set_output_bias(logit)
        self._log(f"output bias: log-odds of the train split's positive rate {rate:.4f} ({rows} rows) = {logit:.4f}")
        return {"positive_rate": rate, "rows": rows, "logit": logit}

    def _keep_recorded_output_bias(self) -> None:
        """After a restore the logit's bias is the checkpoint's: ``config.json`` keeps how the run started (its
        recorded ``--output-bias`` and ``output_bias_init``; a run that predates the option started at ``default``)
        rather than this invocation's option, which changed nothing (rank 0, the writer of ``config.json``)."""
        if not self.ctx.is_main:
            return
        record = self.run.read_config()
        started_with = recorded_option(record["options"], "output_bias")
        if started_with != self.config.output_bias:
            self._log(f"--resume: the run started with --output-bias {started_with} ({self.run.config_file}); "
                      f"its bias is the checkpoint's, --output-bias {self.config.output_bias} is not applied")
        self.config = dataclasses.replace(self.config, output_bias=started_with)
        self.output_bias_init = record.get("output_bias_init")

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            print(message, file=self._log_stream, flush=True)

    def close(self) -> None:
        """Releases the run directory's lock (rank 0); :meth:`fit` calls it when it ends."""
        self.run.close()

    def _write_config(self) -> None:
        if not self.ctx.is_main:
            return
        model = self.model
        record = {
            "options": dataclasses.asdict(self.config),
            "optimizer": dataclasses.asdict(self.built.optim_config),
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
                **({"extra_train": [str(Path(d).resolve()) for d in self.extra_train]} if self.extra_train else {}),
            },
            "model": {
                "name": self.config.model,
                "embedding_params": int(model.embedding_params),
                "dense_params": int(model.dense_params),
                "embedding_bytes": int(model.embedding_bytes),
            },
            "sharding": self.built.planned.summary,
        }
        self.run.write_config(record, self.built.planned.text)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> Dict[str, Any]:
        return {
            "model": self.dmp.state_dict(),
            "optim": self.built.optimizer.state_dict(),
            "progress": self.state.to_tensors(),
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
        return all_ranks_agree(finite)

    def _kept_checkpoint(self) -> str:
        """What a diverged run leaves behind, as it is."""
        kept = self.run.newest_checkpoint(report=lambda _: None)
        if kept is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is kept: {kept}"

    def save(self) -> Path:
        """Checkpoints model, optimizer state, :attr:`state` and this rank's RNG (a collective), then keeps only
        this checkpoint and the best one (:meth:`~multiembed.training.run_dir.RunDir.retain`).

        Raises:
            TrainingDiverged: a weight is NaN or infinite (nothing is written).
        """
        average_batch_norm_statistics(self.dmp, self.ctx.world_size)
        if self.managed is not None:
            # The keys seen since the last eviction are not module state: the interval ends here, on every rank.
            close_intervals(self.dmp)
        state = self._state()
        if not self._weights_are_finite(state["model"]):
            raise TrainingDiverged(
                f"model weights became NaN or infinite by step {self.state.step}; not checkpointed; "
                f"{self._kept_checkpoint()}. Lower --lr / --sparse-lr."
            )
        path = ckpt.save_checkpoint(self.run_dir, self.state.step, state, self.state.to_dict())
        self.run.retain(path, self.state.best_step)
        barrier()
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
        self.built.optimizer.init_state()
        state = self._state()
        flat, mapping = flatten_state_dict(state)
        sizes = {key: _size_of(value) for key, value in flat.items()}
        entries = ckpt.checkpoint_entries(path)
        if self.managed is not None:
            check_same_world_size(path, entries, self.ctx.world_size)
        pairs, kept = match_saved_state(
            flat, entries, sizes, sparse_optimizer=self.built.optim_config.sparse_optimizer,
            where=str(path),
        )
        loaded = {pairs[key]: flat[key] for key in pairs}
        ckpt.load_checkpoint(path, loaded)
        for key, saved_key in pairs.items():
            flat[key] = loaded[saved_key]
        state = unflatten_state_dict(flat, mapping)
        self.dmp.load_state_dict(state["model"])
        self.built.optimizer.load_state_dict(state["optim"])
        for sched in self.built.schedules:
            sched.post_load_state_dict()
        self.state.load_tensors(state["progress"])
        rank_key = f"rank{self.ctx.rank}"
        if any(key.startswith(rank_key + ".") for key in kept):
            torch.manual_seed(hash((self.config.seed, self.state.step, self.ctx.rank)) & (2**63 - 1))
        else:
            ckpt.set_rng_state(state[rank_key]["rng"])
        # Options may extend a run (a larger --max-steps or --epochs): whether it is done follows from them.
        self.state.done = self.state.finished(self.config)
        self._keep_checkpointed_evaluations()
        note = describe(kept)
        self._log(
            f"{verb} {path} (epoch {self.state.epoch}, batch {self.state.batch}, step "
            f"{self.state.step}) on {self.ctx.world_size} rank(s)" + (f"; {note}" if note else "")
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
        start = dataclasses.replace(self.state)
        self.restore(path, verb="warm-started from")
        self.state = start
        if self.ctx.is_main:
            self.run.keep_metrics(0)

    def _keep_checkpointed_evaluations(self) -> None:
        """Drops the evaluations ``metrics.jsonl`` logged after the restored checkpoint (rank 0)."""
        if not self.ctx.is_main:
            return
        dropped = self.run.keep_metrics(self.state.evaluations)
        if dropped:
            self._log(f"{self.run.metrics_file}: dropped {dropped} evaluation(s) logged after the checkpoint")

    def load_model_only(self, path: Path) -> None:
        """Loads only the model's weights from a checkpoint (e.g. the best one, to test it)."""
        load_model_weights(self.built, path)

    # ---------------------------------------------------------------------------------------------- loops
    def fit(self) -> Dict[str, Any]:
        """Trains to early stopping or ``--epochs``, then tests the best-validation checkpoint.

        Returns:
            The summary written to ``summary.json``.
        """
        try:
            self._start()
            num_batches = self.train_loader.num_batches
            while not self.state.done:
                epoch, start = self.state.epoch, self.state.batch
                stop = self.state.segment_end(self.config, num_batches)
                loss = self._train_segment(epoch, start, stop) if stop > start else float("nan")
                due = self.state.due(self.config, num_batches)
                if due.evaluate:
                    self._validate(loss)
                self.state.end_segment(self.config, num_batches)
                if due.checkpoint or self.state.done:
                    self.save()
            return self._finish()
        finally:
            self.close()

    def _start(self) -> None:
        """Restores the newest checkpoint with ``--resume`` (when there is one), then writes ``config.json``."""
        if self.config.resume:
            found = self.run.newest_checkpoint(report=self._log)
            if found is not None:
                self.restore(found)
                self._keep_recorded_output_bias()
            else:
                self._log(f"--resume: no complete checkpoint in {self.run_dir}; starting from the beginning")
        self._write_config()

    def _train_segment(self, epoch: int, start: int, stop: int) -> float:
        """Trains batches ``[start, stop)`` of ``epoch``; returns the mean loss of this rank."""
        self.dmp.train()
        batches = LoaderWaitTimer(islice(self.train_loader.iter_epoch(epoch, start_batch=start), stop - start))
        # Progress over the whole run (every epoch, or up to --max-steps), so a log gets about ten lines per run
        # rather than ten per segment; a bar on a terminal (training.progress).
        planned = self.config.epochs * self.train_loader.num_batches
        if self.config.max_steps:
            planned = min(planned, self.config.max_steps)
        step = self.state.step
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
        # Not part of the checkpointed state: wall-clock facts of this process only.
        self.loader_wait_s += batches.wait_s
        self.train_wall_s += elapsed
        if steps != stop - start:
            raise RuntimeError(f"the pipeline ran {steps} batches of the {stop - start} it was given")
        self.state.advance(steps, stop, elapsed, self.config.batch_size)
        mean = loss_sum / max(steps, 1)
        if not all_ranks_agree(math.isfinite(mean)):
            raise TrainingDiverged(
                f"training loss is NaN or infinite at step {self.state.step} (epoch {epoch}); "
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

    def _validate(self, train_loss: float) -> None:
        """Validation: early stopping's bookkeeping in :attr:`state`, a line in ``metrics.jsonl`` and in the log."""
        val = self.evaluate("val")
        improved = self.state.record_evaluation(val["auc"])
        throughput = self.state.samples_per_s
        managed = self.managed.read() if self.managed is not None else {}
        collapse = self.information_abundance() if self.state.information_abundance_due(self.config) else {}
        sparse_schedule, dense_schedule = self.built.schedules
        record = {
            "evaluation": self.state.evaluations,
            "epoch": self.state.epoch,
            "step": self.state.step,
            "train_loss": train_loss,
            **{f"val_{k}": v for k, v in val.items()},
            "best_val_auc": self.state.best_auc,
            "samples_per_s": throughput,
            "loader_share": self.loader_share,
            "lr": dense_schedule.param_groups[0]["lr"],
            "sparse_lr": sparse_schedule.param_groups[0]["lr"] if sparse_schedule.param_groups else None,
            **managed,
            **collapse,
        }
        if self.ctx.is_main:
            self.run.append_metrics(record)
        self._log(
            f"step {self.state.step:>7} epoch {self.state.epoch}: val auc {val['auc']:.5f} "
            f"logloss {val['logloss']:.5f} ne {val['ne']:.4f} {'(best)' if improved else ''} "
            f"| {throughput:,.0f} samples/s"
            + (f" | IA mean per set {' '.join(f'{v:.2f}' for v in collapse['ia_mean'])}" if collapse else "")
            + (f" | {_collapsed_text(collapse)}" if collapse.get("collapsed") else "")
            + (f" | {_managed_text(managed)}" if managed else "")
        )

    @property
    def loader_share(self) -> Optional[float]:
        """The share of this process's training time spent waiting for the loader's next batch (None before any
        step): the seconds inside ``next()`` on the batch iterator the pipeline pulls from, over the wall time of the
        training segments (steps included, evaluations and checkpoints not). The pipeline fetches batch ``i + 1``
        during step ``i``, so the wait is part of the step time it is divided by."""
        return self.loader_wait_s / self.train_wall_s if self.train_wall_s > 0 else None

    def _finish(self) -> Dict[str, Any]:
        """Tests the best-validation checkpoint and writes ``summary.json``; returns the summary."""
        best = self.run.checkpoint(self.state.best_step)
        self.load_model_only(best)
        if self.managed is not None:
            self.managed.read()  # training's counts since the last evaluation
        val = self.evaluate("val")
        managed_val = self.managed.read() if self.managed is not None else {}
        test = self.evaluate("test")
        managed_test = self.managed.read() if self.managed is not None else {}
        model = self.model
        summary: Dict[str, Any] = {
            "model": self.config.model,
            "best_step": self.state.best_step,
            "steps": self.state.step,
            "epochs_run": round(self.state.step / self.train_loader.num_batches, 3),
            **{f"val_{k}": v for k, v in val.items()},
            **{f"test_{k}": v for k, v in test.items()},
            "samples_per_s": self.state.samples_per_s,
            "loader_share": self.loader_share,
            "world_size": self.ctx.world_size,
            "embedding_params": int(model.embedding_params),
            "dense_params": int(model.dense_params),
            "checkpoint": best.relative_to(self.run_dir).as_posix(),
        }
        if self.managed is not None:
            totals = self.managed.totals_record()
            summary.update(
                managed_rows=totals["managed_rows"], managed_rows_in_use=managed_test["managed_rows_in_use"],
                managed_train_fallback_share=totals["managed_train_fallback_share"],
                managed_val_fallback_share=managed_val["managed_eval_fallback_share"],
                managed_test_fallback_share=managed_test["managed_eval_fallback_share"],
                managed_assigned=totals["managed_assigned"], managed_evictions=totals["managed_evictions"],
            )
        if self.meta.bayes:
            for split in ("val", "test"):
                if split in self.meta.bayes:
                    summary[f"bayes_{split}_auc"] = self.meta.bayes[split]["auc"]
                    summary[f"bayes_{split}_logloss"] = self.meta.bayes[split]["logloss"]
        if self.ctx.is_main:
            self.run.write_summary(summary)
        return summary


def _collapsed_text(record: Dict[str, Any]) -> str:
    """The collapse monitor's fields of a metrics record, as one phrase for the progress line."""
    return format_collapsed([CollapsedField(**e) for e in record["collapsed"]], record["collapse_warn"])


def _managed_text(record: Dict[str, Any]) -> str:
    """The managed tables' fields of a metrics record, as one phrase for the progress line."""
    share = record["managed_eval_fallback_share"]
    return (f"managed rows in use {record['managed_rows_in_use']}/{record['managed_rows']}, "
            f"val fallback share {'n/a' if share is None else f'{share:.4f}'}, evictions {record['managed_evictions']}")


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
