"""The production loop: a model trained day after day, judged on each day before it trains on it.

``multiembed days --data DAY_0 DAY_1 ... --out RUN`` (:mod:`multiembed.cli.days`) drives one
:class:`~multiembed.training.trainer.Trainer` per day. Day ``k``:

1. starts from day ``k - 1``'s final checkpoint (tables, dense weights, optimizer state:
   :meth:`Trainer.warm_start`); the first day of a run starts from a fresh initialisation;
2. is evaluated on its own train split by that model, before the model sees any of it (*progressive
   validation*: day ``k`` is the validation set of the model of day ``k - 1``);
3. trains one pass over its train split, checkpointing as ``--checkpoint-every`` asks, and is tested on its test
   split (the AUC after);
4. records its line: progressive-validation AUC and log loss, the AUC after, rows, ids never seen on an earlier day
   of the run, IA per embedding set, and the Bayes-optimal AUC of a synthetic day.

The run directory::

    RUN/days.json          the loop's options and the sequence it follows (a rerun with other options is refused)
    RUN/day-003/           day 3's training run (config.json, metrics.jsonl, summary.json, checkpoints/)
    RUN/day-003.before.json   day 3's progressive validation (written before day 3 trains)
    RUN/day-003.json       day 3's line, written when the day is done
    RUN/day-003.seen.npz   the ids seen through day 3 (one bit per id), for "new ids" of a run continued later
    RUN/summary.json       every finished day's line, in day order

Rerunning the same command resumes: a day with its line is not trained again; a day killed mid-way resumes from its
newest checkpoint (on any world size, as a training run does) and ends as if never interrupted; later days follow.
A day given after the run's last day continues the run from it, so a production job adds one day at a time.
``--keep-days N`` keeps the checkpoints of the last N finished days only (0: every day's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from multiembed.config import MODEL_OPTIONS, TrainConfig
from multiembed.data.days import DayPlace, IdHistory, day_ids, read_days
from multiembed.data.metadata import DatasetMetadata, atomic_write_text
from multiembed.runtime.locking import exclusive_lock
from multiembed.training import checkpoint as ckpt
from multiembed.training.build import admit_for_data
from multiembed.training.distributed import DistContext, barrier, init_distributed
from multiembed.training.run_dir import SUMMARY_FILE
from multiembed.training.trainer import Trainer

DAYS_FILE = "days.json"
# The ids seen through a day (data/days.py: IdHistory), beside the day's line: day-003.seen.npz.
SEEN_SUFFIX = ".seen.npz"
# Options of the loop's days that a rerun must keep (the model, and what decides the data order and updates).
FIXED_OPTIONS = (*MODEL_OPTIONS, "batch_size", "seed")


def day_name(index: int) -> str:
    """The name of day ``index``'s entries in a run directory: ``day-003``."""
    return f"day-{index:03d}"


def day_config(base: TrainConfig, data: str, run_dir: Path, index: int) -> TrainConfig:
    """The options of day ``index``'s training run: one pass over its train split, validated once at its end, always
    resumable (a rerun continues the day)."""
    return dataclasses.replace(
        base, data=data, out=str(run_dir / day_name(index)), epochs=1, patience=0, eval_every=0, max_steps=0,
        resume=True, overwrite=False,
    )


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def check_run_record(run_dir: Path, base: TrainConfig, first: DayPlace) -> Optional[str]:
    """Why the run in ``run_dir`` cannot be continued with these options and days (None: it can, or it is new)."""
    path = run_dir / DAYS_FILE
    if not path.is_file():
        return None
    record = _read_json(path)
    for key in FIXED_OPTIONS:
        if record["options"].get(key) != getattr(base, key):
            return (
                f"--{key.replace('_', '-')} is {getattr(base, key)!r} but the run in {run_dir} used "
                f"{record['options'].get(key)!r} ({path})"
            )
    for key in ("sequence", "schema", "hash_space"):
        if record[key] != getattr(first, key):
            return f"--data: the days given are of another {key.replace('_', ' ')} than the run in {run_dir} ({path})"
    return None


def _write_run_record(run_dir: Path, base: TrainConfig, first: DayPlace) -> None:
    record = {
        "options": dataclasses.asdict(base), "sequence": first.sequence, "schema": first.schema,
        "hash_space": first.hash_space,
    }
    atomic_write_text(run_dir / DAYS_FILE, json.dumps(record, indent=2) + "\n")


def _previous_checkpoint(run_dir: Path, index: int, first_of_run: bool) -> Optional[Path]:
    """Day ``index - 1``'s final checkpoint in the run (a collective), None for the run's first day.

    Raises:
        ValueError: a day after the run's first whose previous day left no checkpoint (one line).
    """
    previous = run_dir / day_name(index - 1)
    if index == 0 or (first_of_run and not previous.is_dir()):
        return None
    found = ckpt.newest_valid_checkpoint(previous, report=lambda _: None)
    if found is None or not (previous / SUMMARY_FILE).is_file():
        raise ValueError(
            f"{previous}: day {index - 1} has no finished checkpoint to start day {index} from (not trained yet, or "
            "removed by --keep-days); give the days from the run's last finished day on"
        )
    return found


def _day_line(
    trainer: Trainer, place: DayPlace, data: str, meta: DatasetMetadata, before: Dict[str, Any],
    summary: Dict[str, Any], new_ids: Dict[str, int], ids: Dict[str, int],
) -> Dict[str, Any]:
    ia = trainer.information_abundance()
    line: Dict[str, Any] = {
        "day": place.index,
        "data": data,
        "rows": meta.split_rows()["train"],
        "pv_auc": before["auc"],
        "pv_logloss": before["logloss"],
        "auc_after": summary["test_auc"],
        "logloss_after": summary["test_logloss"],
        "val_auc_after": summary["val_auc"],
        "steps": summary["steps"],
        "ids": sum(ids.values()),
        "new_ids": sum(new_ids.values()),
        "new_ids_per_field": new_ids,
        "ia_mean_per_set": ia["ia_mean"],
        "ia_min_per_set": ia["ia_min"],
    }
    if trainer.managed is not None:
        # The day's ids before training on it (pv: ids new that day share the fallback rows), then over its training.
        totals = trainer.managed.totals_record()
        line["managed_pv_fallback_share"] = before.get("managed_pv_fallback_share")
        for key in ("managed_train_fallback_share", "managed_rows", "managed_assigned", "managed_evictions"):
            line[key] = totals[key]
        line["managed_rows_in_use"] = summary.get("managed_rows_in_use")
    if meta.bayes and "train" in meta.bayes:
        line["bayes_pv_auc"] = meta.bayes["train"]["auc"]
        line["bayes_test_auc"] = meta.bayes.get("test", {}).get("auc")
    return line


def _prune_old_days(run_dir: Path, finished: Sequence[int], keep_days: int) -> None:
    """Removes the checkpoints (and id histories) of finished days older than the last ``keep_days`` (rank 0; 0 keeps
    every day's)."""
    if keep_days <= 0:
        return
    for index in sorted(finished)[:-keep_days]:
        ckpt.prune_checkpoints(run_dir / day_name(index), keep=[])
        (run_dir / f"{day_name(index)}{SEEN_SUFFIX}").unlink(missing_ok=True)


def _finished_days(run_dir: Path) -> List[Dict[str, Any]]:
    """The line of every finished day of the run, the days of earlier invocations included, in day order."""
    return sorted((_read_json(path) for path in run_dir.glob("day-[0-9][0-9][0-9].json")), key=lambda d: d["day"])


def _id_history(run_dir: Path, places: Sequence[Tuple[str, DatasetMetadata, DayPlace]]) -> IdHistory:
    """The ids the run saw before the first day given: the history its previous day saved, when the run has one
    (a run continued with later days), else none."""
    sizes = places[0][1].vocab_sizes
    saved = run_dir / f"{day_name(places[0][2].index - 1)}{SEEN_SUFFIX}"
    if places[0][2].index > 0 and saved.is_file():
        return IdHistory.load(saved, sizes)
    return IdHistory(sizes)


def run_days(
    base: TrainConfig,
    days: Sequence[str],
    run_dir: str,
    keep_days: int = 0,
    ctx: Optional[DistContext] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Trains ``days`` in order into ``run_dir`` (see the module docstring); every rank of the job calls it.

    Args:
        base: the options every day's run shares (its ``data``, ``out``, ``epochs``, ``patience``, ``eval_every``,
            ``max_steps``, ``resume`` and ``overwrite`` are the loop's).
        days: the day dataset directories, in day order.
        run_dir: the loop's run directory.
        keep_days: keep the checkpoints of the last N finished days (0: all).
        ctx: this process's place in the job (``init_distributed()`` when omitted).
        log: where rank 0's lines go.

    Returns:
        The run's summary (``summary.json``): one line per finished day.

    Raises:
        DatasetError: days that are not consecutive days of one sequence (one line).
        ValueError: a rerun with other options or days of another log, a missing previous day (one line).
    """
    if keep_days < 0:
        raise ValueError(f"--keep-days must be >= 0, got {keep_days}")
    places = read_days(days)
    first = places[0][2]
    ctx = ctx or init_distributed(base.device)
    run = Path(run_dir)
    for path, _, _ in places:
        if Path(path).resolve() == run.resolve() or run.resolve() in Path(path).resolve().parents:
            raise ValueError(f"--out {run}: is the day dataset {path} or inside it; a run never writes into its data")
    # Every rank reads the same record, so every rank refuses together.
    problem = check_run_record(run, base, first)
    if problem is not None:
        raise ValueError(problem)
    # A model too big for this machine is refused before the loop's directory is created (each day is admitted too).
    largest = max((meta for _, meta, _ in places), key=lambda meta: sum(meta.vocab_sizes.values()))
    admit_for_data(base, largest, ctx, base.local_batch_size(ctx.world_size))
    with contextlib.ExitStack() as stack:
        if ctx.is_main:
            run.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(run, "days run"))
            _write_run_record(run, base, first)
        barrier()
        return _run(base, places, run, keep_days, ctx, log)


def _run(
    base: TrainConfig, places: Sequence[Tuple[str, DatasetMetadata, DayPlace]], run: Path, keep_days: int,
    ctx: DistContext, log: Callable[[str], None],
) -> Dict[str, Any]:
    history = _id_history(run, places) if ctx.is_main else None
    for position, (data, meta, place) in enumerate(places):
        name = day_name(place.index)
        ids = day_ids(data, meta) if history is not None else {}
        new_ids = history.add(ids) if history is not None else {}
        done = run / f"{name}.json"
        if done.is_file():
            continue
        trainer = Trainer(day_config(base, data, run, place.index), ctx=ctx)
        if ckpt.newest_valid_checkpoint(trainer.run_dir, report=lambda _: None) is None:
            previous = _previous_checkpoint(run, place.index, first_of_run=position == 0)
            if previous is not None:
                trainer.warm_start(previous)
        before_path = run / f"{name}.before.json"
        if before_path.is_file():
            before = _read_json(before_path)
        else:
            before = trainer.evaluate("train")
            if trainer.managed is not None:
                before["managed_pv_fallback_share"] = trainer.managed.read()["managed_eval_fallback_share"]
            if ctx.is_main:
                atomic_write_text(before_path, json.dumps(before, indent=2) + "\n")
        summary = trainer.fit()
        line = _day_line(
            trainer, place, data, meta, before, summary, new_ids, {k: int(v.shape[0]) for k, v in ids.items()}
        )
        if ctx.is_main:
            log(
                f"day {place.index}: progressive validation AUC {line['pv_auc']:.5f} (before training on it), "
                f"AUC after {line['auc_after']:.5f}, {line['rows']} rows, {line['new_ids']} new ids"
            )
            assert history is not None
            history.save(run / f"{name}{SEEN_SUFFIX}")
            atomic_write_text(done, json.dumps(line, indent=2) + "\n")
        del trainer
        gc.collect()
        if ctx.is_main:
            _prune_old_days(run, [line["day"] for line in _finished_days(run)], keep_days)
        barrier()
    result = {"model": base.model, "world_size": ctx.world_size, "days": _finished_days(run)}
    if ctx.is_main:
        atomic_write_text(run / SUMMARY_FILE, json.dumps(result, indent=2) + "\n")
    return result
