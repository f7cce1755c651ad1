"""The run directory: its file names, its lock, the checks before a job writes into it, its records
(``config.json``, ``metrics.jsonl``, ``summary.json``) and the lookup and retention of its checkpoints.

A run directory (shared by all ranks) holds::

    config.json       every option plus provenance (versions, git commit, plan, seeds, data fingerprint)
    plan.txt          the sharding plan, as printed at start
    metrics.jsonl     one line per evaluation
    summary.json      the final result (test metrics of the best-validation checkpoint)
    checkpoints/      DCP checkpoints (see training/checkpoint.py)

The trainer writes through :class:`RunDir`; ``evaluate``, ``analyze``, ``export`` and ``scale`` read through it, as
:mod:`multiembed.data.metadata` owns a dataset and :mod:`multiembed.serving.artifact` an artifact.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from multiembed.config import MODEL_OPTIONS, TrainConfig, recorded_option
from multiembed.data.metadata import DatasetMetadata, atomic_write_text, split_identity
from multiembed.data.paths import is_within
from multiembed.runtime.locking import LOCK_FILE, exclusive_lock
from multiembed.training import checkpoint as ckpt
from multiembed.training.distributed import raise_collectively

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.txt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Every entry a run writes: none of them may be a symbolic link a write would follow.
RUN_ENTRIES = (CONFIG_FILE, SUMMARY_FILE, METRICS_FILE, PLAN_FILE, ckpt.CHECKPOINT_DIR)


def is_run_entry(name: str) -> bool:
    """Whether an entry of a run directory is one a run writes: its files and ``checkpoints/``, the job's lock, or
    a temporary file of an atomic write of one of its files (``.config.json.*.tmp``) left by a killed job.

    Example::

        >>> is_run_entry("summary.json"), is_run_entry(".metrics.jsonl.k2j4.tmp"), is_run_entry("notes.txt")
        (True, True, False)
    """
    if name in RUN_ENTRIES or name == LOCK_FILE:
        return True
    return name.endswith(".tmp") and any(name.startswith(f".{entry}.") for entry in RUN_ENTRIES)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a ``config.json`` value has the type of a :class:`TrainConfig` field (``int``, ``float``, ``str``,
    ``bool``, or ``Optional`` of one; a JSON integer passes for a float, a bool for neither number)."""
    if typing.get_origin(hint) is Union:
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


class RunDir:
    """One run directory (anywhere: runs can be moved and copied).

    Reading needs nothing else; a training job first calls :meth:`open` (checks, lock, ``--overwrite``) and
    :meth:`close` when it ends.

    Args:
        path: the directory.

    Example::

        >>> run = RunDir("runs/me4x")
        >>> run.config_file.name, run.checkpoint(1200).name
        ('config.json', 'step-00001200')
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self._lock: Optional[AbstractContextManager] = None
        # The directories :meth:`open` created (deepest first), which :meth:`abandon` may remove again.
        self._created: List[Path] = []

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def plan_file(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    def is_run(self) -> bool:
        """Whether the directory holds a run's ``config.json``."""
        return self.config_file.is_file()

    # ---------------------------------------------------------------------------------------------- opening
    def open(self, config: TrainConfig, meta: DatasetMetadata, is_main: bool) -> None:
        """Checks ``--out`` against ``config`` (rank 0), takes the job's lock on it and, with ``--overwrite``,
        empties it (a collective: every rank raises rank 0's problem).

        The lock (:func:`~multiembed.runtime.locking.exclusive_lock`, held by rank 0 for the job, released by
        :meth:`close` or when the process ends) refuses a second job on the same directory in one line.

        Raises:
            ValueError: one line: why the directory cannot be used as asked (:meth:`problem`), or the lock is held.
        """
        error: Optional[str] = None
        if is_main:
            error = self.problem(config, meta)
            if error is None:
                error = self._lock_and_clear(config.overwrite)
        raise_collectively(error)

    def _lock_and_clear(self, overwrite: bool) -> Optional[str]:
        """Takes the lock and, with ``overwrite``, deletes the run's entries; the problem, if any, as one line."""
        try:
            self._created = [d for d in (self.path, *self.path.parents) if not d.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            lock = exclusive_lock(self.path, "training run")
            lock_file = lock.__enter__()
        except OSError as e:
            return str(e)
        self._lock = lock
        if overwrite:
            # Only the run's own entries go; the lock file stays (the directory is a run: checked).
            for entry in self.path.iterdir():
                if entry == lock_file:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        return None

    def close(self) -> None:
        """Releases the lock :meth:`open` took (a no-op when none is held)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    def abandon(self) -> None:
        """Releases the lock of a job that ends before writing anything (e.g. refused by admission) and removes the
        directories :meth:`open` created, as long as they are still empty: a refused run leaves no trace, and a
        directory that existed before is kept as it was."""
        self.close()
        created, self._created = self._created, []
        for directory in created:
            try:
                directory.rmdir()  # only an empty directory goes
            except OSError:
                return

    def problem(self, config: TrainConfig, meta: DatasetMetadata) -> Optional[str]:
        """Why ``config.out`` cannot be used as ``config`` asks (None: it can); nothing is touched here."""
        out = self.path
        if out.is_symlink():
            return f"--out {out}: is a symbolic link; give the directory it points to"
        if out.exists() and not out.is_dir():
            return f"--out {out}: exists and is not a directory"
        if is_within(out, config.data):
            return (
                f"--out {out}: is the --data directory {config.data} or inside it; a run never writes into its "
                "dataset"
            )
        if not out.exists() or not any(p.name != LOCK_FILE for p in out.iterdir()):
            return None
        for name in RUN_ENTRIES:
            if (out / name).is_symlink():
                return f"--out {out}: {out / name} is a symbolic link; refusing to write through it"
        if config.overwrite:
            if not self.is_run():
                return (
                    f"--overwrite: {out} is not a multiembed run directory ({CONFIG_FILE} missing); refusing to "
                    "delete it"
                )
            if is_within(config.data, out):
                return f"--overwrite: {out} holds the --data directory {config.data}; refusing to delete it"
            foreign = [p.name for p in sorted(out.iterdir()) if not is_run_entry(p.name)]
            if foreign:
                more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
                return (
                    f"--overwrite: {out} holds {foreign[0]!r}{more}, which no run writes; refusing to delete it "
                    "(move it out of the run directory, or choose another --out)"
                )
            return None
        if config.resume:
            return self.resume_problem(config, meta)
        return f"--out {out}: exists; pass --resume to continue that run or --overwrite to replace it"

    def resume_problem(self, config: TrainConfig, meta: DatasetMetadata) -> Optional[str]:
        """Why ``config`` cannot continue the run recorded here (None: it can): another model option, batch size
        or seed, or data with another vocabulary or split."""
        path = self.config_file
        if not path.is_file():
            return f"--resume: {path} is missing; {self.path} is not a multiembed run directory"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            previous = record["options"]
        except (OSError, ValueError, KeyError) as e:
            return f"--resume: {path} is unreadable ({e})"
        for key in (*MODEL_OPTIONS, "batch_size", "seed"):
            if recorded_option(previous, key) != getattr(config, key):
                return (
                    f"--resume: --{key.replace('_', '-')} is {getattr(config, key)!r} but the run in "
                    f"{self.path} used {recorded_option(previous, key)!r}"
                )
        trained_on = record.get("data", {}).get("vocab_fingerprint")
        if trained_on is not None and trained_on != meta.vocab_fingerprint:
            return (
                f"--resume: --data {config.data} has vocabulary fingerprint {meta.vocab_fingerprint[:16]}... "
                f"but the run in {self.path} was trained on {trained_on[:16]}... ({path})"
            )
        trained_split = record.get("data", {}).get("split_identity")
        current_split = split_identity(meta)
        if trained_split is not None and current_split is not None and trained_split != current_split:
            return (
                f"--resume: --data {config.data} has split identity {current_split[:16]}... but the run in "
                f"{self.path} was trained on {trained_split[:16]}... ({path})"
            )
        return None

    # ---------------------------------------------------------------------------------------------- records
    def read_config(self) -> Dict[str, Any]:
        """The run's ``config.json``.

        Raises:
            ValueError: not a run directory, or not valid JSON (one line naming the file).
        """
        if not self.is_run():
            raise ValueError(f"{self.path}: not a multiembed run directory ({CONFIG_FILE} missing)")
        try:
            return json.loads(self.config_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{self.config_file}: not valid JSON ({e})") from None

    def train_config(self, record: Optional[Dict[str, Any]] = None, **overrides: Any) -> TrainConfig:
        """The :class:`TrainConfig` the run recorded (``record``: its ``config.json``, read when omitted), with
        ``overrides``; an option the run predates has the behaviour the run had
        (:func:`~multiembed.config.recorded_option`).

        Raises:
            ValueError: see :meth:`read_config`; ``options`` missing, or an option of the wrong type (one line naming
                it).
        """
        record = record if record is not None else self.read_config()
        recorded = record.get("options") if isinstance(record, dict) else None
        if not isinstance(recorded, dict):
            raise ValueError(f"{self.config_file}: options: missing or not a JSON object")
        hints = typing.get_type_hints(TrainConfig)
        options = {}
        for f in dataclasses.fields(TrainConfig):
            if f.name in recorded or f.default is not dataclasses.MISSING:
                value = recorded_option(recorded, f.name)
                if f.name in recorded and not _has_type(value, hints[f.name]):
                    raise ValueError(
                        f"{self.config_file}: options.{f.name}: expected {_type_name(hints[f.name])}, got {value!r}"
                    )
                options[f.name] = value
        options.update(overrides)
        return TrainConfig(**options)

    def write_config(self, record: Dict[str, Any], plan_text: str) -> None:
        """Writes ``config.json`` and ``plan.txt`` (each atomically; rank 0 only)."""
        atomic_write_text(self.config_file, json.dumps(record, indent=2, default=str) + "\n")
        atomic_write_text(self.plan_file, plan_text + "\n")

    def append_metrics(self, record: Dict[str, Any]) -> None:
        """Appends one evaluation's line to ``metrics.jsonl`` (rank 0 only).

        Raises:
            ValueError: ``metrics.jsonl`` is a symbolic link.
        """
        path = self.metrics_file
        if path.is_symlink():
            raise ValueError(f"{path}: is a symbolic link; refusing to write through it")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def keep_metrics(self, evaluations: int) -> int:
        """Keeps the first ``evaluations`` lines of ``metrics.jsonl`` (rank 0 only); returns how many it dropped.

        A run killed after an evaluation but before its checkpoint logged an evaluation the resumed run repeats.
        """
        path = self.metrics_file
        if not path.is_file():
            return 0
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if len(lines) <= evaluations:
            return 0
        atomic_write_text(path, "".join(lines[:evaluations]))
        return len(lines) - evaluations

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """Writes ``summary.json`` atomically (rank 0 only)."""
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is published."""
        return self.path / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(step)

    def newest_checkpoint(self, report: Callable[[str], None] = print) -> Optional[Path]:
        """The newest complete checkpoint (a collective; broken ones are reported and skipped), None without one."""
        return ckpt.newest_valid_checkpoint(self.path, report=report)

    def best_checkpoint(self) -> Path:
        """The run's best checkpoint (``summary.json``'s ``best_step``), else its newest valid one.

        Always a directory inside the run directory: a copied or moved run uses its own checkpoints.

        Raises:
            ValueError: no complete checkpoint, or the best one is incomplete or corrupted.
        """
        if self.summary_file.is_file():
            try:
                step = int(json.loads(self.summary_file.read_text(encoding="utf-8"))["best_step"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.summary_file}: no valid best_step ({e})") from None
            path = self.checkpoint(step)
            ckpt.verify_checkpoint(path)
            return path
        found = self.newest_checkpoint()
        if found is None:
            raise ValueError(f"{self.path}: no complete checkpoint to evaluate")
        return found

    def retain(self, newest: Path, best_step: int) -> None:
        """Deletes every published checkpoint but ``newest`` and the one of ``best_step`` (none when negative)
        (rank 0 deletes; call after the save's barrier). Only directories the save published go
        (:func:`~multiembed.training.checkpoint.prune_checkpoints`)."""
        keep: List[Path] = [newest]
        if best_step >= 0:
            keep.append(self.checkpoint(best_step))
        ckpt.prune_checkpoints(self.path, keep)
