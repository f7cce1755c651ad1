"""The days study's results (:mod:`multiembed.analysis.days_study`): rows, paired differences, the report and the plot.

One row per (model, seed, arm, judged day), with the columns of :data:`DAYS_STUDY_COLUMNS`. An *arm* is how the model
judged on day ``k`` was trained, always before it saw day ``k`` (progressive validation, on day ``k``'s train rows):

* ``incremental``: the production loop (``multiembed days``): day 0 from a fresh initialisation, every later day
  warm-started from the day before, one pass a day;
* ``retrain``: a fresh initialisation trained on days ``0 .. k-1`` at once, one pass over their rows shuffled
  together;
* ``frozen``: the model trained on day 0 alone, never updated.

On day 1 the three arms are one model (the one trained on day 0 alone, from the same initialisation and row order),
so arm differences start at day 2. Everything here is a pure function of the rows (no torch), so the report and the
plot can be redrawn from ``days_study.csv``:

- a paired difference pairs the two rows of the same seed and day (same initialisation seed, same row order: pairing
  removes the variance both share) and gives a two-sided Student-t interval over the seeds,
  ``mean +- t_{(1+c)/2, n-1} * std / sqrt(n)``; ``n/a`` below two seeds;
- the *mean over days* of a comparison is, per seed, the mean of its daily differences over the days compared
  (days 2.. for arms, days 1.. for models), then the same t-interval over seeds; the days of one seed are not
  independent, so the seeds are the unit of the interval.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from multiembed.analysis.report import save_figure
from multiembed.analysis.scaling import mean_std, t_critical
from multiembed.data.metadata import atomic_write_text
from multiembed.analysis.tables import format_typed_csv, read_typed_csv, write_typed_csv

DAYS_STUDY_CSV = "days_study.csv"
DAYS_STUDY_MD = "days_study.md"
DAYS_STUDY_PNG = "days_study.png"
ARMS: Tuple[str, ...] = ("incremental", "retrain", "frozen")
# The arm comparisons the report makes, each ``first - second``.
ARM_PAIRS: Tuple[Tuple[str, str], ...] = (("incremental", "retrain"), ("incremental", "frozen"))
# The first day on which the arms are different models (day 1's model is day 0's in every arm).
FIRST_ARM_DAY = 2

DAYS_STUDY_COLUMNS: Tuple[str, ...] = (
    "model", "seed", "arm", "day", "trained_days", "trained_rows", "pv_auc", "pv_logloss", "bayes_pv_auc",
)
_INT_COLUMNS = frozenset({"seed", "day", "trained_days", "trained_rows"})
_STR_COLUMNS = frozenset({"model", "arm"})
Row = Dict[str, Any]
PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------------------- CSV
def format_csv(rows: Iterable[Row]) -> str:
    """``days_study.csv``'s text: a header of :data:`DAYS_STUDY_COLUMNS`, one line per row (floats in full precision)."""
    return format_typed_csv(rows, DAYS_STUDY_COLUMNS)


def write_csv(rows: Iterable[Row], path: PathLike) -> Path:
    """Writes ``days_study.csv`` atomically."""
    return write_typed_csv(rows, DAYS_STUDY_COLUMNS, path)


def read_csv(path: PathLike) -> List[Row]:
    """Reads a ``days_study.csv`` back into typed rows.

    Raises:
        ValueError: wrong header, or a value that does not parse (the message names file, line and column).
    """
    return read_typed_csv(path, DAYS_STUDY_COLUMNS, int_columns=_INT_COLUMNS, str_columns=_STR_COLUMNS)


# --------------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Difference:
    """``first - second`` of the progressive-validation AUC on one day (or the mean over days), paired by seed.

    Attributes:
        first: the first model or arm.
        second: the second.
        within: the arm both models ran (a model comparison) or the model both arms trained (an arm comparison).
        day: the day judged, or None for the mean over the compared days.
        seeds: the seeds that have both.
        mean: mean of the per-seed differences.
        low: lower end of the two-sided t-interval (None below two seeds).
        high: upper end (None below two seeds).
        confidence: the interval's level.
    """

    first: str
    second: str
    within: str
    day: Optional[int]
    seeds: Tuple[int, ...]
    mean: float
    low: Optional[float]
    high: Optional[float]
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (False without an interval)."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def _interval(values: Sequence[float], confidence: float) -> Tuple[float, Optional[float], Optional[float]]:
    mean, std = mean_std(values)
    if std is None:
        return mean, None, None
    half = t_critical(confidence, len(values) - 1) * std / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _differences(
    values: Mapping[Tuple[str, int, int], float], first: str, second: str, within: str, first_day: int,
    confidence: float,
) -> List[Difference]:
    """Per day and over days, ``values[(first, seed, day)] - values[(second, seed, day)]`` over common seeds."""
    per_seed: Dict[int, Dict[int, float]] = {}
    for (name, seed, day), value in values.items():
        other = values.get((second, seed, day))
        if name == first and other is not None and day >= first_day:
            per_seed.setdefault(seed, {})[day] = value - other
    days = sorted({day for by_day in per_seed.values() for day in by_day})
    result: List[Difference] = []
    for day in days:
        seeds = tuple(sorted(s for s, by_day in per_seed.items() if day in by_day))
        mean, low, high = _interval([per_seed[s][day] for s in seeds], confidence)
        result.append(Difference(first, second, within, day, seeds, mean, low, high, confidence))
    # The mean over days: only seeds that have every compared day, so each seed's mean covers the same days.
    complete = tuple(sorted(s for s, by_day in per_seed.items() if set(by_day) == set(days)))
    if days and complete:
        means = [sum(per_seed[s].values()) / len(days) for s in complete]
        mean, low, high = _interval(means, confidence)
        result.append(Difference(first, second, within, None, complete, mean, low, high, confidence))
    return result


def arm_differences(rows: Iterable[Row], confidence: float = 0.95) -> List[Difference]:
    """:data:`ARM_PAIRS` per model, on days :data:`FIRST_ARM_DAY` on (per day, then the mean over days)."""
    rows = list(rows)
    result: List[Difference] = []
    for model in _models(rows):
        values = {(r["arm"], r["seed"], r["day"]): r["pv_auc"] for r in rows if r["model"] == model}
        for first, second in ARM_PAIRS:
            result.extend(_differences(values, first, second, model, FIRST_ARM_DAY, confidence))
    return result


def model_differences(rows: Iterable[Row], confidence: float = 0.95) -> List[Difference]:
    """The first model (in row order) minus every other, per arm, on every judged day, then the mean over days."""
    rows = list(rows)
    models = _models(rows)
    result: List[Difference] = []
    for arm in _arms(rows):
        values = {(r["model"], r["seed"], r["day"]): r["pv_auc"] for r in rows if r["arm"] == arm}
        for other in models[1:]:
            result.extend(_differences(values, models[0], other, arm, 1, confidence))
    return result


def _models(rows: Sequence[Row]) -> List[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def _arms(rows: Sequence[Row]) -> List[str]:
    present = {r["arm"] for r in rows}
    return [arm for arm in ARMS if arm in present]


def mean_pv_auc(rows: Iterable[Row]) -> Dict[Tuple[str, str, int], Tuple[float, int]]:
    """Mean progressive-validation AUC over seeds and the seed count, per (model, arm, day)."""
    groups: Dict[Tuple[str, str, int], List[float]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["arm"], row["day"]), []).append(row["pv_auc"])
    return {key: (sum(v) / len(v), len(v)) for key, v in groups.items()}


# ------------------------------------------------------------------------------------------------------- report
def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def _difference_line(d: Difference, digits: int) -> str:
    interval = "n/a" if d.low is None else f"[{_signed(d.low, digits)}, {_signed(d.high, digits)}]"  # type: ignore[arg-type]
    day = "mean over days" if d.day is None else str(d.day)
    return f"| {d.first} - {d.second} | {d.within} | {day} | {len(d.seeds)} | {_signed(d.mean, digits)} | {interval} |"


def difference_table(differences: Sequence[Difference], digits: int = 5) -> str:
    """A markdown table of paired differences, one line each."""
    head = "| difference | within | day | seeds | mean | interval |\n|---|---|---|---|---|---|"
    return "\n".join([head, *(_difference_line(d, digits) for d in differences)])


def pv_table(rows: Sequence[Row], digits: int = 4) -> str:
    """Mean progressive-validation AUC per (model, arm) and day, with the Bayes-optimal AUC of each day."""
    means = mean_pv_auc(rows)
    days = sorted({r["day"] for r in rows})
    lines = [
        "| model | arm | seeds | " + " | ".join(f"day {d}" for d in days) + " |",
        "|---|---|---|" + "---|" * len(days),
    ]
    for model in _models(rows):
        for arm in _arms(rows):
            cells = [means.get((model, arm, d)) for d in days]
            seeds = max((c[1] for c in cells if c is not None), default=0)
            text = " | ".join("-" if c is None else f"{c[0]:.{digits}f}" for c in cells)
            lines.append(f"| {model} | {arm} | {seeds} | {text} |")
    bayes = {r["day"]: r["bayes_pv_auc"] for r in rows if not math.isnan(r["bayes_pv_auc"])}
    if bayes:
        lines.append("| Bayes-optimal | | | " + " | ".join(
            f"{bayes[d]:.{digits}f}" if d in bayes else "-" for d in days) + " |")
    return "\n".join(lines)


def verdict(difference: Difference, digits: int = 4) -> str:
    """One sentence: which side of 0 a mean-over-days difference lies on, or that its interval includes 0."""
    name = f"{difference.first} - {difference.second} ({difference.within})"
    if difference.low is None:
        return f"{name}: {_signed(difference.mean, digits)} from {len(difference.seeds)} seed(s), no interval."
    interval = f"[{_signed(difference.low, digits)}, {_signed(difference.high, digits)}]"  # type: ignore[arg-type]
    if not difference.excludes_zero:
        return f"{name}: {_signed(difference.mean, digits)}, interval {interval} includes 0: no difference shown."
    side = "higher" if difference.mean > 0 else "lower"
    return f"{name}: {_signed(difference.mean, digits)}, interval {interval}: {difference.first} is {side}."


def format_markdown(rows: Sequence[Row], notes: Sequence[str] = (), confidence: float = 0.95) -> str:
    """``days_study.md``: the mean PV AUC per day and arm, the paired differences and a verdict per comparison."""
    arms = arm_differences(rows, confidence)
    models = model_differences(rows, confidence)
    overall = [d for d in [*arms, *models] if d.day is None]
    parts = [
        "# Days study: incremental vs retrained vs frozen, progressive-validation AUC",
        "",
        *(f"- {note}" for note in notes),
        "",
        "## Progressive-validation AUC per day (mean over seeds; the model before it saw the day, on its train rows)",
        "",
        pv_table(rows),
        "",
        f"## Arms, paired by seed (days {FIRST_ARM_DAY}..; {confidence:.0%} t-interval over seeds)",
        "",
        difference_table(arms),
        "",
        f"## Models, paired by seed ({confidence:.0%} t-interval over seeds)",
        "",
        difference_table(models),
        "",
        "## Verdicts (mean over days)",
        "",
        *(f"- {verdict(d)}" for d in overall),
        "",
    ]
    return "\n".join(parts)


def write_markdown(rows: Sequence[Row], path: PathLike, notes: Sequence[str] = ()) -> Path:
    """Writes ``days_study.md`` atomically."""
    path = Path(path)
    atomic_write_text(path, format_markdown(rows, notes))
    return path


# --------------------------------------------------------------------------------------------------------- plot
_ARM_STYLE = {"incremental": ("o-", "C0"), "retrain": ("s--", "C1"), "frozen": ("^:", "C2")}


def plot_days_study(rows: Sequence[Row], path: PathLike) -> Dict[str, Any]:
    """One panel per model: the mean PV AUC per day of each arm (each seed's as faint points) and the Bayes-optimal
    AUC; a last panel: the first model minus each other, per arm and day, with the paired intervals.

    Returns:
        The plotted means, ``{model: {arm: {"day": [...], "pv_auc": [...]}}}``.
    """
    from matplotlib.figure import Figure

    models, arms = _models(rows), _arms(rows)
    means = mean_pv_auc(rows)
    days = sorted({r["day"] for r in rows})
    bayes = {r["day"]: r["bayes_pv_auc"] for r in rows if not math.isnan(r["bayes_pv_auc"])}
    panels = len(models) + (1 if len(models) > 1 else 0)
    fig = Figure(figsize=(4.2 * panels, 3.6))
    series: Dict[str, Any] = {}
    low = min(r["pv_auc"] for r in rows)
    high = max([r["pv_auc"] for r in rows] + list(bayes.values()))
    for i, model in enumerate(models):
        ax = fig.add_subplot(1, panels, i + 1)
        series[model] = {}
        for arm in arms:
            style, colour = _ARM_STYLE[arm]
            xs = [d for d in days if (model, arm, d) in means]
            ys = [means[(model, arm, d)][0] for d in xs]
            series[model][arm] = {"day": xs, "pv_auc": ys}
            ax.plot(xs, ys, style, color=colour, label=arm)
            seeds = [r for r in rows if r["model"] == model and r["arm"] == arm]
            ax.plot([r["day"] for r in seeds], [r["pv_auc"] for r in seeds], ".", color=colour, alpha=0.3)
        if bayes:
            ax.plot(sorted(bayes), [bayes[d] for d in sorted(bayes)], "-", color="gray", lw=0.8, label="Bayes-optimal")
        ax.set_ylim(low - 0.005, high + 0.005)
        ax.set_xticks(days)
        ax.set_xlabel("day judged")
        ax.set_ylabel("progressive-validation AUC" if i == 0 else "")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=7)
    if len(models) > 1:
        ax = fig.add_subplot(1, panels, panels)
        width = 0.8 / max(len(arms) * (len(models) - 1), 1)
        for d in model_differences(rows):
            if d.day is None:
                continue
            slot = arms.index(d.within) * (len(models) - 1) + models.index(d.second) - 1
            x = d.day - 0.4 + width * (slot + 0.5)
            colour = _ARM_STYLE[d.within][1]
            err = None if d.low is None else [[d.mean - d.low], [d.high - d.mean]]
            ax.errorbar([x], [d.mean], yerr=err, fmt="o", color=colour, ms=4, capsize=2,
                        label=d.within if d.day == days[0] and d.second == models[1] else None)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xticks(days)
        ax.set_xlabel("day judged")
        ax.set_title(f"{models[0]} - {', '.join(models[1:])} (paired by seed)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, Path(path))
    return series
