"""The scaling study's results: rows, aggregation over seeds, the paper-style table and the scaling figure.

One row per trained configuration (backbone x mode x scale x seed), with the columns of :data:`SCALING_COLUMNS`.
Everything here is a pure function of those rows (no torch, no model), so ``scaling.md`` and ``scaling.png`` can be
redrawn from ``scaling.csv`` and every number is testable by hand:

- cells are the mean over seeds with the *sample* standard deviation (``ddof=1``; no std for one seed);
- the paired ME - SE difference pairs the two runs of the same backbone, scale and seed (same data order and seed:
  pairing removes the seed-to-seed variance both share) and gives a two-sided Student-t interval over the seeds'
  differences, ``mean +- t_{(1+c)/2, n-1} * std / sqrt(n)``; ``n/a`` below two pairs. CTR work calls 0.001 AUC
  significant, so a claim at that level needs the interval to exclude 0.

``ia_mean`` is the information abundance averaged over every (set, field) of the run's best checkpoint, rows
L2-normalised: it is bounded by the set width ``d`` (SE ``s * base``, ME ``base``), so SE and ME of one scale have
different ceilings. ``ia_concat_mean`` is the paper's like-for-like figure: per field the IA of the whole embedding
(SE's one ``[D_i, s*base]`` table, ME's ``s`` sets side by side, also ``[D_i, s*base]``), averaged over fields;
``ia_random_mean`` is the same average for uniform random tables of that shape (a fresh initialisation,
:func:`multiembed.collapse.monitor.random_init_ia`), the reference a collapsed model falls below. ``bayes_test_auc``
is the dataset's Bayes-optimal test AUC (synthetic data; NaN where unknown).

Study modes (:data:`STUDY_MODES`): ``se``, ``me``, ``mesi`` (the paper's ablation: ME sets sharing one interaction)
``se-sr`` (SE trained with the spectral regulariser, the paper's other ablation; the weight is the study's
``--spectral-reg``), ``se-pr`` (SE DCNv2 with the projection regulariser of its cross maps, the paper's Evidence III;
weight ``--projection-reg``), ``se-pwr`` (the same with a learnable scalar per field-pair map, ``--pair-scales``:
the paper's weighted variant) and ``me-dr`` (ME DCNv2 with the set divergence penalty, the paper's Fig. 8(d)
ablation; weight ``--divergence-reg``). Every mode's paired difference to SE of the same backbone, scale and seed is
reported.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from multiembed.data.metadata import atomic_write, atomic_write_text
from multiembed.analysis.tables import format_typed_csv, read_typed_csv, write_typed_csv

SCALING_CSV = "scaling.csv"
SCALING_MD = "scaling.md"
SCALING_PNG = "scaling.png"

SCALING_COLUMNS: Tuple[str, ...] = (
    "backbone", "mode", "scale", "seed", "val_auc", "test_auc", "test_logloss", "bayes_test_auc", "ia_mean",
    "ia_concat_mean", "ia_random_mean", "embedding_params", "dense_params", "samples_per_s",
)
_INT_COLUMNS = frozenset({"scale", "seed", "embedding_params", "dense_params"})
_STR_COLUMNS = frozenset({"backbone", "mode"})
# Display names of the paper's backbones (anything else is shown upper-cased).
_BACKBONE_NAMES = {"dnn": "DNN", "ipnn": "IPNN", "nfwfm": "NFwFM", "xdeepfm": "xDeepFM", "dcnv2": "DCNv2",
                   "dcnv2lr": "DCNv2 (low-rank)", "finalmlp": "FinalMLP", "dlrm": "DLRM"}
_MODE_ORDER = {"se": 0, "me": 1, "mesi": 2, "se-sr": 3, "se-pr": 4, "se-pwr": 5, "me-dr": 6, "hetero": 7}


@dataclass(frozen=True)
class StudyMode:
    """A mode of the study: the zoo's model mode it trains and whether the spectral regulariser is on.

    Attributes:
        model_mode: ``se``, ``me`` or ``mesi`` (the model name's mode).
        spectral_reg: True: the runs train with the study's ``--spectral-reg`` weight (other modes with 0).
        label: the name in tables and figures.
        heterogeneous: True: the runs train ``hetero-me-{s}x`` with the study's backbone as the first expert,
            followed by the study's ``--experts`` (:func:`point_experts`), so that at 1x it is SE of the backbone.
        projection_reg: True: the runs train with the study's ``--projection-reg`` weight (others with 0).
        divergence_reg: True: the runs train with the study's ``--divergence-reg`` weight (others with 0).
        pair_scales: True: the runs train with ``--pair-scales`` (a learnable scalar per field-pair map of DCNv2's
            first cross layer; others without).
    """

    model_mode: str
    spectral_reg: bool
    label: str
    heterogeneous: bool = False
    projection_reg: bool = False
    divergence_reg: bool = False
    pair_scales: bool = False


STUDY_MODES: Dict[str, StudyMode] = {
    "se": StudyMode("se", False, "SE"),
    "me": StudyMode("me", False, "ME"),
    "mesi": StudyMode("mesi", False, "MESI"),
    "se-sr": StudyMode("se", True, "SE+SR"),
    "se-pr": StudyMode("se", False, "SE+PR", projection_reg=True),
    "se-pwr": StudyMode("se", False, "SE+PWR", projection_reg=True, pair_scales=True),
    "me-dr": StudyMode("me", False, "ME+DR", divergence_reg=True),
    "hetero": StudyMode("me", False, "HETERO", heterogeneous=True),
}


def point_experts(backbone: str, experts: str) -> str:
    """The experts of the ``hetero`` mode's runs for ``backbone``: the backbone first, then the study's
    ``--experts`` without it (comma-separated).

    Example::

        >>> point_experts("dnn", "dcnv2,ipnn,nfwfm,dnn")
        'dnn,dcnv2,ipnn,nfwfm'
    """
    rest = [e.strip() for e in experts.split(",") if e.strip() and e.strip() != backbone]
    return ",".join([backbone, *rest])


def _mode_label(mode: str) -> str:
    return STUDY_MODES[mode].label if mode in STUDY_MODES else mode.upper()

Row = Dict[str, Any]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class StudyPoint:
    """One configuration of the study.

    Attributes:
        backbone: e.g. ``dcnv2``.
        mode: a :data:`STUDY_MODES` key (``se``, ``me``, ``mesi``, ``se-sr``).
        scale: the scale factor ``s``.
        seed: the run's seed.

    Example::

        >>> StudyPoint("dcnv2", "me", 4, 0).run_name
        'dcnv2-me-4x-seed0'
        >>> StudyPoint("dcnv2", "se-sr", 4, 0).model, StudyPoint("dcnv2", "se-sr", 4, 0).run_name
        ('dcnv2-se-4x', 'dcnv2-se-sr-4x-seed0')
    """

    backbone: str
    mode: str
    scale: int
    seed: int

    @property
    def model(self) -> str:
        """The zoo model name, e.g. ``dcnv2-me-4x`` (``se-sr`` trains ``dcnv2-se-4x``, ``hetero``
        ``hetero-me-4x``)."""
        mode = STUDY_MODES[self.mode]
        backbone = "hetero" if mode.heterogeneous else self.backbone
        return f"{backbone}-{mode.model_mode}-{self.scale}x"

    @property
    def heterogeneous(self) -> bool:
        """True for the ``hetero`` mode's runs (their experts: :func:`point_experts`)."""
        return STUDY_MODES[self.mode].heterogeneous

    @property
    def spectral_reg(self) -> bool:
        """True when the run trains with the study's spectral regulariser weight."""
        return STUDY_MODES[self.mode].spectral_reg

    @property
    def run_name(self) -> str:
        """The run directory's name, e.g. ``dcnv2-me-4x-seed0``, ``dcnv2-se-sr-4x-seed0``."""
        return f"{self.backbone}-{self.mode}-{self.scale}x-seed{self.seed}"


def study_grid(
    backbones: Sequence[str], modes: Sequence[str], scales: Sequence[int], num_seeds: int
) -> List[StudyPoint]:
    """Every configuration, seed-major: all of seed 0 first, so an interrupted study already covers the whole grid.

    Within a seed: backbone, then scale, then mode (SE and ME of one scale run back to back).

    Args:
        backbones: backbone names, in the order the table lists them.
        modes: :data:`STUDY_MODES` keys.
        scales: scale factors.
        num_seeds: seeds ``0 .. num_seeds - 1``.

    Raises:
        ValueError: an empty or duplicated list, an unknown mode, a scale below 1 or fewer than one seed.

    Example::

        >>> [p.run_name for p in study_grid(["dnn"], ["se", "me"], [1, 2], 1)]
        ['dnn-se-1x-seed0', 'dnn-me-1x-seed0', 'dnn-se-2x-seed0', 'dnn-me-2x-seed0']
    """
    for name, values in (("--backbones", backbones), ("--modes", modes), ("--scales", scales)):
        if not values:
            raise ValueError(f"{name}: give at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"{name}: duplicated values in {list(values)}")
    unknown = [m for m in modes if m not in STUDY_MODES]
    if unknown:
        raise ValueError(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(STUDY_MODES)}")
    if any(int(s) < 1 for s in scales):
        raise ValueError(f"--scales: every scale must be >= 1, got {list(scales)}")
    if num_seeds < 1:
        raise ValueError(f"--seeds: the number of seeds must be >= 1, got {num_seeds}")
    return [
        StudyPoint(b, m, int(s), seed)
        for seed in range(num_seeds) for b in backbones for s in scales for m in modes
    ]


def ia_mean(sets: Sequence[Mapping[str, float]]) -> float:
    """Information abundance averaged over every (set, field): ``sets`` is ``CollapseResult.sets``."""
    values = [float(v) for s in sets for v in s.values()]
    if not values:
        raise ValueError("ia_mean: no IA values")
    return float(np.mean(values))


def ia_concat_mean(collapse: Mapping[str, Any]) -> float:
    """IA of each field's whole embedding averaged over fields: SE's one table, ME's sets side by side (``concat``).

    Raises:
        ValueError: a result of several sets without ``concat``.
    """
    sets = collapse["sets"]
    if len(sets) == 1:
        return ia_mean(sets)
    if not collapse.get("concat"):
        raise ValueError(f"ia_concat_mean: {len(sets)} sets but no concatenated IA")
    return float(np.mean([float(v) for v in collapse["concat"].values()]))


def make_row(
    point: StudyPoint,
    summary: Mapping[str, Any],
    ia: float,
    ia_concat: Optional[float] = None,
    ia_random: Optional[float] = None,
) -> Row:
    """The CSV row of one run from its ``summary.json`` and its IA figures (None: NaN, not measured).

    ``bayes_test_auc`` comes from the summary (NaN when the data has no known Bayes-optimal AUC).
    """
    row: Row = {
        "backbone": point.backbone, "mode": point.mode, "scale": point.scale, "seed": point.seed, "ia_mean": ia,
        "ia_concat_mean": math.nan if ia_concat is None else float(ia_concat),
        "ia_random_mean": math.nan if ia_random is None else float(ia_random),
        "bayes_test_auc": float(summary["bayes_test_auc"]) if summary.get("bayes_test_auc") is not None else math.nan,
    }
    for column in SCALING_COLUMNS:
        if column not in row:
            if column not in summary:
                raise ValueError(f"run {point.run_name}: summary has no {column!r}")
            row[column] = int(summary[column]) if column in _INT_COLUMNS else float(summary[column])
    return {column: row[column] for column in SCALING_COLUMNS}


def sort_rows(rows: Iterable[Row], backbones: Optional[Sequence[str]] = None) -> List[Row]:
    """Rows ordered by backbone (in ``backbones``' order, else by name), mode (SE first), scale, seed."""
    order = {b: i for i, b in enumerate(backbones or [])}
    return sorted(
        rows,
        key=lambda r: (order.get(r["backbone"], len(order)), r["backbone"], _MODE_ORDER.get(r["mode"], 9), r["mode"],
                       r["scale"], r["seed"]),
    )


# ------------------------------------------------------------------------------------------------------------ CSV
def format_csv(rows: Iterable[Row]) -> str:
    """``scaling.csv``'s text: a header of :data:`SCALING_COLUMNS`, one line per row (floats in full precision)."""
    return format_typed_csv(rows, SCALING_COLUMNS)


def write_csv(rows: Iterable[Row], path: PathLike) -> Path:
    """Writes ``scaling.csv`` atomically."""
    return write_typed_csv(rows, SCALING_COLUMNS, path)


def read_csv(path: PathLike) -> List[Row]:
    """Reads a ``scaling.csv`` back into typed rows.

    Raises:
        ValueError: wrong header, or a value that does not parse (the message names file, line and column).
    """
    return read_typed_csv(path, SCALING_COLUMNS, int_columns=_INT_COLUMNS, str_columns=_STR_COLUMNS)


# --------------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``; None for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std: no values")
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else None


def _t_two_sided_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4: a finite series)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2.0 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(1, (df - 3) // 2 + 1):
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2.0 / math.pi * (theta + math.sin(theta) * total)


def t_critical(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: ``t`` with ``P(|T| <= t) = confidence`` for ``df`` degrees of freedom.

    scipy is not in the pinned stack; for the integer degrees of freedom a seed count gives, the t distribution
    function is a finite series (Abramowitz & Stegun 26.7.3-4), inverted here by bisection to double precision.

    Args:
        confidence: e.g. 0.95.
        df: degrees of freedom, >= 1 (``n - 1`` for ``n`` seeds).

    Example::

        >>> round(t_critical(0.95, 2), 4)
        4.3027
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"t_critical: confidence must be in (0, 1), got {confidence}")
    if int(df) != df or df < 1:
        raise ValueError(f"t_critical: degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    low, high = 0.0, 1.0
    while _t_two_sided_mass(high, df) < confidence:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _t_two_sided_mass(middle, df) < confidence:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class CellStats:
    """A metric over the seeds of one (backbone, mode, scale) cell."""

    n: int
    mean: float
    std: Optional[float]


def aggregate(rows: Iterable[Row], metric: str) -> Dict[Tuple[str, str, int], CellStats]:
    """``metric``'s mean and sample std over seeds per (backbone, mode, scale)."""
    groups: Dict[Tuple[str, str, int], List[float]] = {}
    for row in rows:
        groups.setdefault((row["backbone"], row["mode"], int(row["scale"])), []).append(float(row[metric]))
    return {key: CellStats(len(values), *mean_std(values)) for key, values in groups.items()}


@dataclass(frozen=True)
class PairedDifference:
    """ME - SE of one metric for one backbone and scale, paired by seed.

    Attributes:
        backbone: the backbone.
        scale: the scale.
        seeds: the seeds that have both runs.
        mean: mean of the per-seed differences.
        std: their sample std (None for one pair).
        low: lower end of the two-sided t-interval (None for one pair).
        high: upper end (None for one pair).
        confidence: the interval's confidence level.
    """

    backbone: str
    scale: int
    seeds: Tuple[int, ...]
    mean: float
    std: Optional[float]
    low: Optional[float]
    high: Optional[float]
    confidence: float

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired_differences(
    rows: Iterable[Row], metric: str = "test_auc", confidence: float = 0.95, first: str = "me", second: str = "se"
) -> List[PairedDifference]:
    """``first - second`` (ME - SE) of ``metric`` per backbone and scale, over the seeds that ran both.

    Returns:
        one :class:`PairedDifference` per (backbone, scale) with at least one pair, by backbone (first appearance)
        and scale.
    """
    values: Dict[Tuple[str, int, str], Dict[int, float]] = {}
    backbones: List[str] = []
    for row in rows:
        if row["backbone"] not in backbones:
            backbones.append(row["backbone"])
        values.setdefault((row["backbone"], int(row["scale"]), row["mode"]), {})[int(row["seed"])] = float(row[metric])
    out = []
    scales = sorted({scale for _, scale, _ in values})
    for backbone in backbones:
        for scale in scales:
            a, b = values.get((backbone, scale, first), {}), values.get((backbone, scale, second), {})
            seeds = tuple(sorted(set(a) & set(b)))
            if not seeds:
                continue
            diffs = [a[s] - b[s] for s in seeds]
            mean, std = mean_std(diffs)
            low = high = None
            if std is not None:
                half = t_critical(confidence, len(diffs) - 1) * std / math.sqrt(len(diffs))
                low, high = mean - half, mean + half
            out.append(PairedDifference(backbone, scale, seeds, mean, std, low, high, confidence))
    return out


# -------------------------------------------------------------------------------------------------- markdown
def _backbone_label(backbone: str) -> str:
    return _BACKBONE_NAMES.get(backbone, backbone.upper())


def _layout(rows: Sequence[Row]) -> Tuple[List[Tuple[str, str]], List[int]]:
    """Table rows (backbone, mode) in first-appearance order of backbones, SE before ME; columns = sorted scales."""
    backbones: List[str] = []
    modes: Dict[str, set] = {}
    for row in rows:
        if row["backbone"] not in backbones:
            backbones.append(row["backbone"])
        modes.setdefault(row["backbone"], set()).add(row["mode"])
    lines = [(b, m) for b in backbones for m in sorted(modes[b], key=lambda m: (_MODE_ORDER.get(m, 9), m))]
    return lines, sorted({int(r["scale"]) for r in rows})


def _cell(stats: Optional[CellStats], digits: int, max_n: int) -> str:
    if stats is None or math.isnan(stats.mean):
        return "-"
    text = f"{stats.mean:.{digits}f}"
    if stats.std is not None:
        text += f" ± {stats.std:.{digits}f}"
    if stats.n != max_n:
        text += f" (n={stats.n})"
    return text


def metric_table(rows: Sequence[Row], metric: str, digits: int) -> str:
    """A markdown table laid out like the paper's Table 1: one line per backbone x mode, one column per scale."""
    lines, scales = _layout(rows)
    cells = aggregate(rows, metric)
    max_n = max(s.n for s in cells.values())
    out = ["| model | " + " | ".join(f"{s}x" for s in scales) + " |", "|---|" + "---|" * len(scales)]
    for backbone, mode in lines:
        values = [_cell(cells.get((backbone, mode, s)), digits, max_n) for s in scales]
        out.append(f"| {_backbone_label(backbone)} {_mode_label(mode)} | " + " | ".join(values) + " |")
    return "\n".join(out)


def with_derived(rows: Iterable[Row]) -> List[Row]:
    """The rows with two derived metrics: ``bayes_gap`` (Bayes-optimal minus test AUC) and ``ia_concat_ratio``
    (``ia_concat_mean / ia_random_mean``: the whole embedding's IA as a fraction of a fresh initialisation's)."""
    out = []
    for row in rows:
        extra = dict(row)
        extra["bayes_gap"] = float(row["bayes_test_auc"]) - float(row["test_auc"])
        random_ia = float(row["ia_random_mean"])
        extra["ia_concat_ratio"] = float(row["ia_concat_mean"]) / random_ia if random_ia > 0 else math.nan
        out.append(extra)
    return out


def difference_table(differences: Sequence[PairedDifference], digits: int = 5, label: str = "ME - SE") -> str:
    """Paired differences (ME - SE, or ``label``) as a markdown table (``n/a`` for the interval below two seeds)."""
    out = [f"| backbone | scale | seeds | {label} (mean) | std | 95% interval |", "|---|---|---|---|---|---|"]
    for d in differences:
        std = "n/a" if d.std is None else f"{d.std:.{digits}f}"
        interval = "n/a" if d.low is None else f"[{d.low:+.{digits}f}, {d.high:+.{digits}f}]"
        label = _backbone_label(d.backbone)
        out.append(f"| {label} | {d.scale}x | {d.n} | {d.mean:+.{digits}f} | {std} | {interval} |")
    if len(out) == 2:
        out.append(f"| - | - | 0 | no scale has both runs of {label} | | |")
    return "\n".join(out)


def format_markdown(rows: Sequence[Row], title: str = "Scaling study", notes: Sequence[str] = ()) -> str:
    """``scaling.md``: test AUC (the paper's Table 1 layout), paired differences to SE with t-intervals, the gap to
    the Bayes-optimal AUC, test log loss, the whole embedding's IA (absolute and against a random initialisation's),
    the per-set IA, parameters.

    Args:
        rows: the study's rows (any order).
        title: the heading.
        notes: extra lines written under the heading (e.g. the options the runs used, failed runs).
    """
    if not rows:
        raise ValueError("format_markdown: no rows (no run finished)")
    seeds = sorted({int(r["seed"]) for r in rows})
    confidence = 0.95
    derived = with_derived(rows)
    modes = list(dict.fromkeys(sorted((r["mode"] for r in rows), key=lambda m: (_MODE_ORDER.get(m, 9), m))))
    bayes = sorted({round(float(r["bayes_test_auc"]), 5) for r in rows if not math.isnan(float(r["bayes_test_auc"]))})
    parts = [
        f"# {title}",
        "",
        f"Mean ± sample std over seeds ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: "
        f"{', '.join(str(s) for s in seeds)}); `(n=k)` marks a cell with fewer runs. Columns are the scale factor "
        "(embedding parameters relative to the base model); SE widens one embedding set, ME uses that many sets of "
        "the base width.",
        *[f"- {note}" for note in notes],
    ]
    if bayes:
        parts.append(f"- Bayes-optimal test AUC of the data: {', '.join(f'{b:.5f}' for b in bayes)}")
    parts += [
        "",
        "## Test AUC",
        "",
        metric_table(rows, "test_auc", 5),
        "",
        f"## ME - SE test AUC, paired by seed ({confidence:.0%} t-interval over seeds)",
        "",
        "An AUC gain of 0.001 is significant in CTR work: an interval that excludes 0 supports the difference.",
        "",
        difference_table(paired_differences(rows, "test_auc", confidence)),
        "",
    ]
    for mode in modes:
        if mode in ("se", "me"):
            continue
        label = f"{_mode_label(mode)} - SE"
        parts += [
            f"## {label} test AUC, paired by seed ({confidence:.0%} t-interval over seeds)",
            "",
            difference_table(paired_differences(rows, "test_auc", confidence, first=mode), label=label),
            "",
        ]
    if bayes:
        parts += [
            "## Gap to the Bayes-optimal test AUC (Bayes - model; 0 is the ceiling)",
            "",
            metric_table(derived, "bayes_gap", 5),
            "",
        ]
    parts += [
        "## Test log loss",
        "",
        metric_table(rows, "test_logloss", 5),
        "",
        "## Information abundance of the whole embedding per field (`ia_concat_mean`: SE's one table, ME's sets "
        "side by side; mean over fields, rows L2-normalised)",
        "",
        metric_table(rows, "ia_concat_mean", 3),
        "",
        "Random initialisation of the same shape (`ia_random_mean`, uniform `[D_i, s*d]` tables):",
        "",
        metric_table(rows, "ia_random_mean", 3),
        "",
        "## Whole-embedding IA as a fraction of the random initialisation's (`ia_concat_mean / ia_random_mean`)",
        "",
        metric_table(derived, "ia_concat_ratio", 3),
        "",
        "## Information abundance per set (mean over sets and fields; at most the set width d)",
        "",
        metric_table(rows, "ia_mean", 3),
        "",
        "## Parameters (embedding / dense) and training throughput (samples/s)",
        "",
        _params_table(rows),
        "",
    ]
    return "\n".join(parts)


def _params_table(rows: Sequence[Row]) -> str:
    lines, scales = _layout(rows)
    emb, dense, speed = (aggregate(rows, m) for m in ("embedding_params", "dense_params", "samples_per_s"))
    out = ["| model | " + " | ".join(f"{s}x" for s in scales) + " |", "|---|" + "---|" * len(scales)]
    for backbone, mode in lines:
        cells = []
        for s in scales:
            key = (backbone, mode, s)
            cells.append(
                "-" if key not in emb else f"{emb[key].mean:,.0f} / {dense[key].mean:,.0f} ({speed[key].mean:,.0f}/s)"
            )
        out.append(f"| {_backbone_label(backbone)} {_mode_label(mode)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_markdown(
    rows: Sequence[Row], path: PathLike, title: str = "Scaling study", notes: Sequence[str] = ()
) -> Path:
    """Writes ``scaling.md`` atomically."""
    path = Path(path)
    atomic_write_text(path, format_markdown(rows, title, notes))
    return path


# ---------------------------------------------------------------------------------------------------- figure
def _set_width(backbone: str, mode: str, scale: int, base_widths: Mapping[str, int]) -> Optional[int]:
    base = base_widths.get(backbone)
    if base is None:
        return None
    return base * scale if mode == "se" else base


def scaling_series(rows: Sequence[Row], metric: str) -> Dict[Tuple[str, str], Dict[str, List[float]]]:
    """Per (backbone, mode): ``{"scales": [...], "mean": [...], "std": [...]}`` (std 0 where one seed), by scale."""
    cells = aggregate(rows, metric)
    lines, _ = _layout(rows)
    series: Dict[Tuple[str, str], Dict[str, List[float]]] = {}
    for backbone, mode in lines:
        keys = sorted((k for k in cells if k[0] == backbone and k[1] == mode), key=lambda k: k[2])
        series[(backbone, mode)] = {
            "scales": [k[2] for k in keys],
            "mean": [cells[k].mean for k in keys],
            "std": [cells[k].std or 0.0 for k in keys],
        }
    return series


def _colour(backbone: str, mode: str, backbones: Sequence[str]) -> str:
    """One colour per backbone when there are several (modes differ by marker and line), else one per mode."""
    if len(backbones) > 1:
        return f"C{list(backbones).index(backbone)}"
    order = list(STUDY_MODES)
    return f"C{order.index(mode)}" if mode in order else "C9"


def plot_scaling(
    rows: Sequence[Row], path: PathLike, base_widths: Optional[Mapping[str, int]] = None
) -> Dict[str, Any]:
    """``scaling.png``, the paper's Table 1 and Figure 1 in one picture, three panels over the scale: test AUC; IA of
    the whole embedding (``ia_concat_mean``) with the random-initialisation reference (``ia_random_mean``, grey);
    IA per set (``ia_mean``) with each line's ceiling, the set width. One line per backbone x mode, error bars =
    std over seeds.

    Args:
        rows: the study's rows.
        path: the PNG to write (atomically).
        base_widths: backbone -> base set width, to draw each line's per-set IA ceiling (the set width d) dashed;
            None leaves the ceilings out.

    Returns:
        ``{"auc": series, "ia": series of ia_concat_mean, "ia_random": series, "ia_sets": series of ia_mean,
        "ceilings": {(backbone, mode): [d per scale]}}`` with the series of :func:`scaling_series`: exactly what was
        drawn.
    """
    if not rows:
        raise ValueError("plot_scaling: no rows")
    auc, ia = scaling_series(rows, "test_auc"), scaling_series(rows, "ia_concat_mean")
    ia_random, ia_sets = scaling_series(rows, "ia_random_mean"), scaling_series(rows, "ia_mean")
    fig = Figure(figsize=(17.0, 4.8), layout="constrained")
    ax_auc, ax_ia, ax_sets = fig.subplots(1, 3)
    backbones = list(dict.fromkeys(b for b, _ in auc))
    styles = {"se": ("o", "--"), "me": ("s", "-"), "mesi": ("^", ":"), "se-sr": ("v", "-.")}
    ceilings: Dict[Tuple[str, str], List[int]] = {}
    all_scales = sorted({int(r["scale"]) for r in rows})
    random_drawn = set()
    for (backbone, mode), data in auc.items():
        colour = _colour(backbone, mode, backbones)
        marker, line = styles.get(mode, ("x", "-."))
        label = f"{_backbone_label(backbone)} {_mode_label(mode)}"
        ax_auc.errorbar(data["scales"], data["mean"], yerr=data["std"], marker=marker, linestyle=line, color=colour,
                        capsize=3, label=label)
        whole = ia[(backbone, mode)]
        ax_ia.errorbar(whole["scales"], whole["mean"], yerr=whole["std"], marker=marker, linestyle=line,
                       color=colour, capsize=3, label=label)
        reference = ia_random[(backbone, mode)]
        key = (backbone, tuple(reference["scales"]), tuple(round(v, 6) for v in reference["mean"]))
        if key not in random_drawn and not all(math.isnan(v) for v in reference["mean"]):
            random_drawn.add(key)
            ax_ia.plot(reference["scales"], reference["mean"], color="grey", linestyle=":", marker=".",
                       label=f"{_backbone_label(backbone)}: random init" if len(backbones) > 1 else "random init")
        per_set = ia_sets[(backbone, mode)]
        ax_sets.errorbar(per_set["scales"], per_set["mean"], yerr=per_set["std"], marker=marker, linestyle=line,
                         color=colour, capsize=3, label=label)
        if base_widths is not None:
            widths = [_set_width(backbone, mode, s, base_widths) for s in per_set["scales"]]
            if all(w is not None for w in widths):
                ceilings[(backbone, mode)] = [int(w) for w in widths]  # type: ignore[arg-type]
                ax_sets.plot(per_set["scales"], widths, linestyle=line, color=colour, alpha=0.35, linewidth=1,
                             label=f"{label}: ceiling d")
    for ax in (ax_auc, ax_ia, ax_sets):
        ax.set_xscale("log")
        ax.set_xticks(all_scales)
        ax.set_xticklabels([f"{s}x" for s in all_scales])
        ax.minorticks_off()
        ax.set_xlabel("scale (embedding parameters / base model's)")
        ax.grid(alpha=0.3)
    ax_auc.set_ylabel("test AUC (mean ± std over seeds)")
    ax_auc.set_title("Test AUC vs scale")
    ax_auc.legend(fontsize=8)
    ax_ia.set_ylabel("IA of the whole embedding (mean over fields)")
    ax_ia.set_title("Whole-embedding IA vs scale (SE table, ME sets side by side)")
    ax_ia.legend(fontsize=7)
    ax_sets.set_ylabel("IA per set (mean over sets and fields)")
    ax_sets.set_title("IA per set vs scale (rows L2-normalised)")
    # SE's per-set ceiling grows with the scale: a log axis keeps ME's values readable next to it.
    ax_sets.set_yscale("log")
    ax_sets.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_sets.yaxis.set_major_formatter(ScalarFormatter())
    ax_sets.yaxis.set_minor_formatter(NullFormatter())
    ax_sets.legend(fontsize=7)
    fig.suptitle("Scaling: single embedding (SE) vs multi-embedding (ME)")
    FigureCanvasAgg(fig)
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return {"auc": auc, "ia": ia, "ia_random": ia_random, "ia_sets": ia_sets, "ceilings": ceilings}
