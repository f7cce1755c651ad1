"""The comparison a production team makes on a day sequence: the incremental loop against retraining from scratch
and against a frozen day-0 model, for several models, paired by seed (``multiembed days-study``).

For every model and seed, with day ``k`` judged by a model that has not seen it (progressive validation: the AUC on
day ``k``'s train rows, :mod:`multiembed.analysis.days_compare`):

* ``incremental``: the production loop, :func:`multiembed.training.days.run_days` (its own run directory; its
  progressive validation is the loop's ``pv_auc``);
* ``retrain``: for each ``k >= 2``, a fresh initialisation trained for one pass over days ``0 .. k-1`` together: their
  train splits are read as one split (``Trainer(extra_train=...)``, the loader's ``extra_data``: no day is converted
  or copied again) and shuffled together; validation and test are day ``k - 1``'s. On day 1 it is the loop's day-0
  model (trained on day 0 alone from the same initialisation and row order), which is not trained twice;
* ``frozen``: the loop's day-0 model, evaluated on every later day.

Why the retrain arm reads the days as one shuffled split rather than training them one after the other from a fresh
initialisation: with the same seed and the same per-day schedule that *is* the incremental loop, step for step (the
loop's warm start restores exactly the state the previous day ended with), so it would measure nothing. A model
retrained from scratch sees the same rows once each, in an order that ignores time: the comparison isolates what
training in time order (the most recent day last) is worth.

Layout of ``OUT``::

    study.json                        the options, models, seeds and day sequence (a rerun with others is refused)
    <model>-seed<k>/incremental/      the loop's run directory (multiembed days)
    <model>-seed<k>/retrain/days-000-002/   the run trained on days 0..2 at once (judged on day 3)
    <model>-seed<k>/judged/<arm>-day-003.json   a frozen or retrained model's evaluation on day 3's train rows
    logs/<model>-seed<k>.log          every trainer's log of that model and seed
    days_study.csv, days_study.md, days_study.png   the results

Resumable at every level: the loop resumes per day and within a day, a retrain run whose ``summary.json`` exists is
not trained again (one interrupted continues from its newest checkpoint), and an evaluation with its file is not run
again. Adding days, models or seeds to a finished study trains only what is new.

The study runs in one process (every run one after the other over one process group, as ``multiembed scale`` does);
the loop itself runs on any number of ranks with ``multiembed days``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from multiembed.analysis.days_compare import (
    DAYS_STUDY_CSV,
    DAYS_STUDY_MD,
    DAYS_STUDY_PNG,
    Row,
    plot_days_study,
    write_csv,
    write_markdown,
)
from multiembed.config import TrainConfig
from multiembed.data.days import DayPlace, read_days
from multiembed.data.metadata import DatasetMetadata, atomic_write_text
from multiembed.data.paths import is_within
from multiembed.runtime.locking import exclusive_lock
from multiembed.training import checkpoint as ckpt
from multiembed.training.days import day_name, run_days
from multiembed.training.distributed import DistContext, init_distributed
from multiembed.training.evaluation import model_for_run
from multiembed.training.run_dir import SUMMARY_FILE
from multiembed.training.trainer import Trainer

STUDY_FILE = "study.json"
# TrainConfig fields that are not options of the whole study: each point's, the loop's, or display only.
_NOT_STUDY_OPTIONS = frozenset({
    "data", "out", "model", "seed", "epochs", "patience", "eval_every", "max_steps", "resume", "overwrite", "progress",
})
Days = Sequence[Tuple[str, DatasetMetadata, DayPlace]]


@dataclasses.dataclass(frozen=True)
class StudyPoint:
    """One model and seed of the study.

    Example::

        >>> StudyPoint("dcnv2-me-4x", 1).name
        'dcnv2-me-4x-seed1'
    """

    model: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-seed{self.seed}"


def retrain_name(first: int, last: int) -> str:
    """The retrain run directory of days ``first .. last``: ``days-000-002``."""
    return f"days-{first:03d}-{last:03d}"


def study_options(base: TrainConfig) -> Dict[str, Any]:
    """The options every run of the study shares (what a rerun must keep)."""
    return {k: v for k, v in dataclasses.asdict(base).items() if k not in _NOT_STUDY_OPTIONS}


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to compute it again") from None


def _check_record(out: Path, base: TrainConfig, first: DayPlace) -> None:
    """Refuses to continue a study of other options or another log (one line)."""
    path = out / STUDY_FILE
    if not path.is_file():
        return
    record = _read_json(path)
    for key, value in study_options(base).items():
        if record["options"].get(key) != value:
            raise ValueError(
                f"--{key.replace('_', '-')} is {value!r} but the study in {out} used {record['options'].get(key)!r} "
                f"({path}); use another --out"
            )
    for key in ("sequence", "schema", "hash_space"):
        if record[key] != getattr(first, key):
            raise ValueError(f"--data: the days given are of another {key.replace('_', ' ')} than the study in {out} "
                             f"({path})")


def _write_record(out: Path, base: TrainConfig, first: DayPlace, points: Sequence[StudyPoint]) -> None:
    path = out / STUDY_FILE
    old = _read_json(path) if path.is_file() else {}
    models = list(dict.fromkeys([*old.get("models", []), *(p.model for p in points)]))
    seeds = sorted({*old.get("seeds", []), *(p.seed for p in points)})
    record = {
        "options": study_options(base), "models": models, "seeds": seeds, "sequence": first.sequence,
        "schema": first.schema, "hash_space": first.hash_space,
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _bayes(meta: DatasetMetadata) -> float:
    return float(meta.bayes["train"]["auc"]) if meta.bayes and "train" in meta.bayes else float("nan")


class _Point:
    """The three arms of one model and seed (single process)."""

    def __init__(self, base: TrainConfig, point: StudyPoint, days: Days, out: Path, ctx: DistContext,
                 log: Callable[[str], None]) -> None:
        self.config = dataclasses.replace(base, model=point.model, seed=point.seed)
        self.point, self.days, self.ctx, self.log = point, days, ctx, log
        self.dir = out / point.name
        self.loop_dir = self.dir / "incremental"
        self.first_run = self.loop_dir / day_name(days[0][2].index)

    def incremental(self) -> List[Dict[str, Any]]:
        """Runs (or resumes) the loop; its finished days' lines."""
        summary = run_days(self.config, [d for d, _, _ in self.days], str(self.loop_dir), ctx=self.ctx,
                           log=lambda line: self.log(f"{self.point.name}: {line}"))
        return summary["days"]

    def retrain(self, last: int) -> Tuple[Path, int]:
        """Trains (or resumes) the run on days ``0 .. last`` (positions in the days given) at once; its final
        checkpoint and the rows it trained on."""
        data = [d for d, _, _ in self.days[: last + 1]]
        run = self.dir / "retrain" / retrain_name(self.days[0][2].index, self.days[last][2].index)
        if not (run / SUMMARY_FILE).is_file():
            self.log(f"{self.point.name}: retraining from scratch on days {self.days[0][2].index}.."
                     f"{self.days[last][2].index} ({run})")
            config = dataclasses.replace(
                self.config, data=data[-1], out=str(run), epochs=1, patience=0, eval_every=0, max_steps=0,
                resume=True, overwrite=False,
            )
            Trainer(config, ctx=self.ctx, extra_train=data[:-1]).fit()
            gc.collect()
        return self._final(run), int(_read_json(run / SUMMARY_FILE)["steps"]) * self.config.batch_size

    def _final(self, run: Path) -> Path:
        found = ckpt.newest_valid_checkpoint(run, report=lambda _: None)
        if found is None:
            raise ValueError(f"{run}: finished but holds no complete checkpoint; delete it to train it again")
        return found

    def judge(self, arm: str, position: int, checkpoint: Path, model: Any) -> Dict[str, Any]:
        """The evaluation of ``checkpoint`` on the train rows of the day at ``position`` (cached in ``judged/``)."""
        data, _, place = self.days[position]
        path = self.dir / "judged" / f"{arm}-{day_name(place.index)}.json"
        if path.is_file():
            return _read_json(path)
        if model.get("run") is None:
            model["run"] = model_for_run(self.first_run, device=self.config.device, ctx=self.ctx)
        model["run"].load(checkpoint)
        result = model["run"].evaluate(data, "train")
        record = {"auc": result["auc"], "logloss": result["logloss"], "rows": result.get("rows"),
                  "checkpoint": str(checkpoint.relative_to(self.dir))}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        return record

    def rows(self) -> List[Row]:
        """Trains what is missing, evaluates what is missing; one row per arm and judged day."""
        lines = {line["day"]: line for line in self.incremental()}
        indices = [place.index for _, _, place in self.days]
        steps_before = 0
        trained_before: List[int] = []
        result: List[Row] = []
        retrained = {position: self.retrain(position - 1) for position in range(2, len(self.days))}
        first_checkpoint = self._final(self.first_run)
        model: Dict[str, Any] = {"run": None}
        for position, (_, meta, place) in enumerate(self.days):
            line = lines[place.index]
            if position > 0:
                common = {"model": self.point.model, "seed": self.point.seed, "day": place.index,
                          "bayes_pv_auc": _bayes(meta)}
                result.append({**common, "arm": "incremental", "trained_days": len(trained_before),
                               "trained_rows": steps_before * self.config.batch_size, "pv_auc": line["pv_auc"],
                               "pv_logloss": line["pv_logloss"]})
                frozen = self.judge("frozen", position, first_checkpoint, model)
                first_rows = lines[indices[0]]["steps"] * self.config.batch_size
                result.append({**common, "arm": "frozen", "trained_days": 1, "trained_rows": first_rows,
                               "pv_auc": frozen["auc"], "pv_logloss": frozen["logloss"]})
                # Retrained on day 0 alone is the day-0 model itself (same initialisation, same row order).
                checkpoint, rows = retrained.get(position, (first_checkpoint, first_rows))
                again = self.judge("retrain", position, checkpoint, model) if position in retrained else frozen
                result.append({**common, "arm": "retrain", "trained_days": position, "trained_rows": rows,
                               "pv_auc": again["auc"], "pv_logloss": again["logloss"]})
            steps_before += line["steps"]
            trained_before.append(place.index)
        del model
        gc.collect()
        return result


def run_days_study(
    base: TrainConfig,
    days: Sequence[str],
    out: str,
    points: Sequence[StudyPoint],
    ctx: Optional[DistContext] = None,
    log: Callable[[str], None] = print,
) -> List[Row]:
    """Runs the study (see the module docstring) and writes its CSV, report and plot into ``out``.

    Args:
        base: the options every run shares (``model`` and ``seed`` are each point's; ``data``, ``out`` and the
            schedule are the study's: one pass a day).
        days: the day dataset directories, in day order (at least two).
        out: the study directory (continued when it exists).
        points: the models and seeds.
        ctx: this process's place in the job (``init_distributed()`` when omitted; one process only).
        log: where progress lines go.

    Returns:
        The rows of ``days_study.csv``.

    Raises:
        DatasetError: days that are not consecutive days of one log (one line).
        ValueError: fewer than two days, no points, several ranks, or a study of other options in ``out``.
    """
    if len(days) < 2:
        raise ValueError(f"--data: a days study judges every day after the first; give at least 2 days, got {len(days)}")
    if not points:
        raise ValueError("--models / --seeds: the study has no model or no seed")
    places = read_days(days)
    first = places[0][2]
    study = Path(out)
    for path, _, _ in places:
        if is_within(study, path):
            raise ValueError(f"--out {study}: is the day dataset {path} or inside it; a study never writes into its data")
    _check_record(study, base, first)
    ctx = ctx or init_distributed(base.device)
    if ctx.world_size > 1:
        raise ValueError(
            f"days-study runs in one process (this job has {ctx.world_size} ranks); the loop alone runs on several "
            "with multiembed days"
        )
    study.mkdir(parents=True, exist_ok=True)
    rows: List[Row] = []
    with exclusive_lock(study, "days study"):
        _write_record(study, base, first, points)
        (study / "logs").mkdir(exist_ok=True)
        for point in points:
            log(f"{point.name}: incremental, retrain and frozen arms over {len(places)} days")
            with open(study / "logs" / f"{point.name}.log", "a", encoding="utf-8") as trainer_log, \
                    contextlib.redirect_stderr(trainer_log):
                rows.extend(_Point(base, point, places, study, ctx, log).rows())
        notes = [
            "days: " + ", ".join(f"`{path}`" for path, _, _ in places),
            "models: " + ", ".join(dict.fromkeys(p.model for p in points)) + "; seeds: "
            + ", ".join(str(s) for s in sorted({p.seed for p in points})),
            "options: " + ", ".join(f"{k}={v}" for k, v in sorted(study_options(base).items())),
        ]
        write_csv(rows, study / DAYS_STUDY_CSV)
        write_markdown(rows, study / DAYS_STUDY_MD, notes)
        plot_days_study(rows, study / DAYS_STUDY_PNG)
    return rows


def console_log(stream: Any = None) -> Callable[[str], None]:
    """A log that writes to ``stream`` (the process's stderr at the time of the call by default), even while the
    trainers' output is redirected to the study's log files."""
    target = stream if stream is not None else sys.stderr
    return lambda line: print(line, file=target, flush=True)
