"""The paper's mechanism figures 3, 5, 6 and 8, re-drawn from trained runs.

Every figure reads what the package already writes: a run directory (``multiembed train``) or a scaling study
(``multiembed scale``: ``scaling.csv``, ``runs/<run>/collapse.json``, ``summary.json``, ``metrics.jsonl`` and the
checkpoints). Nothing here trains.

- Fig. 3 (evidence I and II): the sub-embedding IA of field ``i`` as field ``j`` sees it, ``ia[i][j]`` (FFM's
  field-aware sub-embeddings, DCNv2's ``E_i W_{i->j}^T``), with the fields ordered by their own IA. The paper's trend
  (IA rises with ``i`` and with ``j``) is measured by two rank correlations: of a field's own IA with the mean IA of
  its sub-embeddings (over ``j``, ``rho_source``) and with the mean IA of what it sees (over ``i``, ``rho_target``),
  per run (seed) and on the mean over runs.
- Fig. 5 (evidence III) and Fig. 6 (evidence IV): metrics against the scale for some (backbone, mode) series of
  studies, the mean over seeds; Fig. 5's regularised series are named by their weight, so studies at several
  weights are drawn side by side.
- Fig. 8: ME against SE at one scale: the IA of each field's whole embedding, ME's IA per set, the norms
  ``||W^(m)_{i->j}||_F`` of each set's first cross layer and their spread over sets, and the test AUC against the
  scale of SE, ME and ME under the set divergence penalty (one series per weight).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from multiembed.analysis.scaling import SCALING_CSV, Row, StudyPoint, read_csv

# The metrics the scale figures can draw: scaling.csv's columns and the train loss read from metrics.jsonl.
METRIC_LABELS: Dict[str, str] = {
    "ia_mean": "IA (mean over sets and fields)",
    "ia_concat_mean": "IA of the whole embedding",
    "test_auc": "test AUC",
    "val_auc": "validation AUC",
    "train_loss": "train loss at the best step (with any regulariser)",
}
SCALE_COLUMNS: Tuple[str, ...] = ("backbone", "mode", "scale", "seed", *METRIC_LABELS)


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on the ranks, ties given their mean rank); NaN below 3 points or for a
    constant series.

    Example::

        >>> round(rank_correlation([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0]), 6)
        0.8
    """
    if len(x) != len(y):
        raise ValueError(f"rank_correlation: {len(x)} values against {len(y)}")
    if len(x) < 3:
        return math.nan

    def ranks(values: Sequence[float]) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        order = np.argsort(array, kind="stable")
        result = np.empty(len(array))
        result[order] = np.arange(len(array), dtype=np.float64)
        for value in np.unique(array):  # ties: the mean rank
            tied = array == value
            result[tied] = result[tied].mean()
        return result

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


# ------------------------------------------------------------------------------------------------------- Fig. 3
@dataclass(frozen=True)
class SubEmbeddingView:
    """The sub-embedding IA of one model.

    Attributes:
        label: the name in the figure (e.g. ``FFM``).
        model: the run's model name.
        fields: the fields, in the model's order.
        own_ia: ``{field: IA}`` of each field's whole embedding (rows L2-normalised).
        ia: ``ia[i][j]``, the IA of field ``i``'s sub-embedding as field ``j`` sees it (the diagonal is the field's
            own map: DCNv2's ``W_{i->i}``, FFM's whole embedding).
    """

    label: str
    model: str
    fields: List[str]
    own_ia: Dict[str, float]
    ia: List[List[float]]

    def order(self) -> List[int]:
        """Field indices by own IA, lowest first (the paper's axes)."""
        return sorted(range(len(self.fields)), key=lambda k: (self.own_ia[self.fields[k]], k))

    def trend(self) -> Dict[str, float]:
        """``rho_source``: own IA of ``i`` against the mean over ``j != i`` of ``ia[i][j]``; ``rho_target``: own IA
        of ``j`` against the mean over ``i != j`` of ``ia[i][j]`` (Spearman, :func:`rank_correlation`).

        Example::

            >>> view = SubEmbeddingView("x", "m", ["a", "b", "c"], {"a": 1.0, "b": 2.0, "c": 3.0},
            ...                         [[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]])
            >>> {k: round(v, 6) for k, v in view.trend().items()}
            {'rho_source': 1.0, 'rho_target': 1.0}
        """
        n = len(self.fields)
        own = [self.own_ia[f] for f in self.fields]
        source = [float(np.mean([self.ia[i][j] for j in range(n) if j != i])) for i in range(n)]
        target = [float(np.mean([self.ia[i][j] for i in range(n) if i != j])) for j in range(n)]
        return {"rho_source": rank_correlation(own, source), "rho_target": rank_correlation(own, target)}


def sub_embedding_view(label: str, model: str, collapse: Mapping[str, Any]) -> SubEmbeddingView:
    """The :class:`SubEmbeddingView` of a single-embedding run's ``collapse.json`` dict (with ``sub_embedding``).

    Raises:
        ValueError: several sets, or no sub-embedding IA (the backbone has no field-pair maps: not DCNv2 or FFM).
    """
    if len(collapse["sets"]) != 1:
        raise ValueError(f"{model}: the sub-embedding figure reads single-embedding runs, this one has "
                         f"{len(collapse['sets'])} sets")
    if not collapse.get("sub_embedding"):
        raise ValueError(f"{model}: no sub-embedding IA (only DCNv2's cross layer and FFM's sub-embeddings have one)")
    entry = collapse["sub_embedding"][0]
    return SubEmbeddingView(label, model, list(entry["fields"]), {f: float(collapse["sets"][0][f])
                                                                   for f in entry["fields"]},
                            [[float(v) for v in row] for row in entry["ia"]])


def mean_view(views: Sequence[SubEmbeddingView]) -> SubEmbeddingView:
    """The mean over runs of one model (e.g. its seeds): own IA and ``ia[i][j]`` averaged field by field.

    Raises:
        ValueError: no views, or views of different labels or fields.

    Example::

        >>> a = SubEmbeddingView("x", "m", ["a", "b"], {"a": 1.0, "b": 2.0}, [[0.0, 1.0], [2.0, 0.0]])
        >>> b = SubEmbeddingView("x", "m", ["a", "b"], {"a": 3.0, "b": 2.0}, [[0.0, 3.0], [4.0, 0.0]])
        >>> mean_view([a, b]).own_ia, mean_view([a, b]).ia
        ({'a': 2.0, 'b': 2.0}, [[0.0, 2.0], [3.0, 0.0]])
    """
    if not views:
        raise ValueError("mean_view: no runs")
    first = views[0]
    for view in views[1:]:
        if view.label != first.label or view.fields != first.fields:
            raise ValueError(f"mean_view: {view.label} {view.model} has other fields than {first.label} "
                             f"{first.model}; average runs of one model on one dataset")
    own = {f: float(np.mean([v.own_ia[f] for v in views])) for f in first.fields}
    ia = np.mean([np.asarray(v.ia, dtype=np.float64) for v in views], axis=0)
    return SubEmbeddingView(first.label, first.model, list(first.fields), own, ia.tolist())


def tercile_means(view: SubEmbeddingView) -> List[List[float]]:
    """``[a][b]``: the mean ``ia[i][j]`` (``i != j``) over fields ``i`` in third ``a`` and ``j`` in third ``b`` of
    the fields ordered by own IA (0: the lowest third), the paper's trend in nine numbers.

    Example::

        >>> view = SubEmbeddingView("x", "m", ["a", "b", "c"], {"a": 1.0, "b": 2.0, "c": 3.0},
        ...                         [[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]])
        >>> tercile_means(view)[0]
        [nan, 3.0, 4.0]
    """
    groups = np.array_split(np.asarray(view.order()), 3)
    ia = np.asarray(view.ia, dtype=np.float64)
    result = []
    for rows in groups:
        line = []
        for columns in groups:
            cells = [ia[i, j] for i in rows for j in columns if i != j]
            line.append(float(np.mean(cells)) if cells else math.nan)
        result.append(line)
    return result


def fig3_csv(runs: Sequence[Tuple[str, SubEmbeddingView]]) -> str:
    """One line per (run, source field, target field), with each field's rank by own IA in that run (0: lowest).

    Args:
        runs: ``(run name, view)`` pairs.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("model", "run", "source", "target", "source_rank", "target_rank", "source_own_ia",
                     "target_own_ia", "ia"))
    for run, view in runs:
        rank = {k: r for r, k in enumerate(view.order())}
        for i, source in enumerate(view.fields):
            for j, target in enumerate(view.fields):
                writer.writerow((view.model, run, source, target, rank[i], rank[j], f"{view.own_ia[source]:.6f}",
                                 f"{view.own_ia[target]:.6f}", f"{view.ia[i][j]:.6f}"))
    return out.getvalue()


def plot_fig3(views: Sequence[SubEmbeddingView], path: Path) -> Dict[str, Any]:
    """One heat map per model (a :func:`mean_view` where it had several runs), ``ia[i][j]`` with rows ``i``
    (source) and columns ``j`` (target) ordered by own IA, the paper's layout. Returns the matrices drawn."""
    from matplotlib.figure import Figure

    from multiembed.analysis.report import save_figure

    fig = Figure(figsize=(5.8 * len(views), 4.4))
    fig.subplots_adjust(wspace=0.45)
    drawn: Dict[str, Any] = {}
    for k, view in enumerate(views):
        ax = fig.add_subplot(1, len(views), k + 1)
        order = view.order()
        matrix = np.array([[view.ia[i][j] if i != j else np.nan for j in order] for i in order])
        image = ax.imshow(matrix, cmap="viridis", origin="lower")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        labels = [view.fields[i] for i in order]
        size = 7 if len(order) <= 16 else 5
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(len(order)), labels, fontsize=size)
        ax.set_xlabel("field j (sees), by own IA")
        ax.set_ylabel("field i (seen), by own IA")
        trend = view.trend()
        ax.set_title(f"{view.label}: IA of field i seen by j\nrho_i {trend['rho_source']:.2f}, "
                     f"rho_j {trend['rho_target']:.2f}", fontsize=9)
        drawn[view.label] = {"fields": labels, "ia": matrix.tolist()}
    save_figure(fig, path)
    return drawn


def _spread(values: Sequence[float]) -> Dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def write_fig3(runs: Mapping[str, Sequence[Tuple[str, SubEmbeddingView]]], out: Path) -> Dict[str, Any]:
    """Writes ``fig3.csv`` (every run), ``fig3.json`` and ``fig3.png`` (:func:`plot_fig3` of each model's
    :func:`mean_view`); returns the JSON's content.

    ``fig3.json`` holds per model (``runs``: label -> its ``(run name, view)`` pairs): the trend of every run and its
    mean, min and max over runs (``rho_source``, ``rho_target``), and of the mean view the fields by own IA, their
    own IA, its trend and its :func:`tercile_means`.
    """
    from multiembed.data.metadata import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fig3.csv", fig3_csv([pair for pairs in runs.values() for pair in pairs]))
    means = {label: mean_view([view for _, view in pairs]) for label, pairs in runs.items()}
    plot_fig3(list(means.values()), out / "fig3.png")
    models: Dict[str, Any] = {}
    for label, pairs in runs.items():
        trends = {run: view.trend() for run, view in pairs}
        mean = means[label]
        models[label] = {
            "model": mean.model,
            "runs": trends,
            **{key: _spread([t[key] for t in trends.values()]) for key in ("rho_source", "rho_target")},
            "mean_view": {"fields_by_own_ia": [mean.fields[i] for i in mean.order()], "own_ia": mean.own_ia,
                          **mean.trend(), "tercile_means": tercile_means(mean)},
        }
    record = {"models": models, "data": "fig3.csv", "figure": "fig3.png"}
    atomic_write_text(out / "fig3.json", json.dumps(record, indent=1) + "\n")
    return record


# ------------------------------------------------------------------------------------------ studies (Fig. 5, 6, 8)
def read_study_rows(studies: Sequence[Path], weighted: Optional[Mapping[str, str]] = None) -> List[Row]:
    """``scaling.csv`` of every study, concatenated, each row with ``study`` (its directory).

    Args:
        studies: study directories (``multiembed scale --out``).
        weighted: mode -> the option holding its regulariser's weight (``{"se-pr": "projection_reg"}``): the rows
            of that mode are named ``"MODE WEIGHT"`` (``run_mode`` keeps the run's mode, ``weight`` the value read
            from each run's ``config.json``), so that studies of one mode at several weights are drawn side by side.

    Raises:
        ValueError: a study without ``scaling.csv`` (the message names it), or two studies holding the same run of
            the same series.
    """
    rows: List[Row] = []
    seen: Dict[Tuple[str, str, int, int], Path] = {}
    for study in studies:
        path = Path(study) / SCALING_CSV
        if not path.is_file():
            raise ValueError(f"{study}: no {SCALING_CSV} (expected the --out directory of a multiembed scale study)")
        for row in read_csv(path):
            row = {**row, "study": Path(study)}
            if weighted and row["mode"] in weighted:
                weight = float(run_option(run_dir_of(row), weighted[row["mode"]]))
                row.update(mode=f"{row['mode']} {weight:g}", run_mode=row["mode"], weight=weight)
            key = (row["backbone"], row["mode"], int(row["scale"]), int(row["seed"]))
            if key in seen:
                name = StudyPoint(row["backbone"], row.get("run_mode", row["mode"]), row["scale"], row["seed"])
                raise ValueError(f"{path}: run {name.run_name} ({row['mode']}) is also in {seen[key]}; give each "
                                 "run once")
            seen[key] = path
            rows.append(row)
    return rows


# Fig. 5's regularised modes and the option that holds their weight.
FIG5_MODES: Dict[str, str] = {"se-pr": "projection_reg", "se-pwr": "projection_reg"}


def fig5_rows(studies: Sequence[Path], backbone: str = "dcnv2") -> List[Row]:
    """The ``se`` rows and the ``se-pr`` / ``se-pwr`` rows of the studies, the latter named by their weight
    (``"se-pr 0.0001"``, :func:`read_study_rows`), with ``train_loss`` (:func:`with_train_loss`).

    Raises:
        ValueError: no ``se`` runs, or no regularised runs.
    """
    rows = [r for r in read_study_rows(studies, FIG5_MODES) if r["backbone"] == backbone]
    series = sorted({r["mode"] for r in rows})
    if "se" not in series or not any(r.get("run_mode") in FIG5_MODES for r in rows):
        raise ValueError(f"the studies hold no {backbone} se runs beside se-pr or se-pwr runs (they hold "
                         f"{', '.join(series) or 'none'})")
    return with_train_loss([r for r in rows if r["mode"] == "se" or r.get("run_mode") in FIG5_MODES])


def fig5_label(row: Row) -> str:
    """The legend text of a :func:`fig5_rows` row's series (DCNv2's).

    Example::

        >>> fig5_label({"mode": "se-pwr 1e-05", "run_mode": "se-pwr", "weight": 1e-05})
        'DCNv2, weighted regularised, 1e-05'
    """
    kind = {"se-pr": "regularised", "se-pwr": "weighted regularised"}.get(row.get("run_mode", ""))
    return "DCNv2" if kind is None else f"DCNv2, {kind}, {row['weight']:g}"


def run_dir_of(row: Row) -> Path:
    """The run directory of a :func:`read_study_rows` row (``run_mode``, where :func:`ablation_rows` renamed the
    mode, names it)."""
    mode = row.get("run_mode", row["mode"])
    return Path(row["study"]) / "runs" / StudyPoint(row["backbone"], mode, row["scale"], row["seed"]).run_name


def best_train_loss(run_dir: Path) -> float:
    """The train loss ``metrics.jsonl`` recorded at the evaluation of the run's best step (``summary.json``): the
    loss the run minimised, its regulariser terms included.

    Raises:
        ValueError: either file missing or unreadable, or no evaluation at the best step (the message names the file).
    """
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    try:
        best = int(json.loads(summary_path.read_text(encoding="utf-8"))["best_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{summary_path}: cannot read best_step ({e})") from None
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{metrics_path}: cannot read ({e.strerror})") from None
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{metrics_path}: line {number}: not valid JSON") from None
        if int(record.get("step", -1)) == best:
            return float(record["train_loss"])
    raise ValueError(f"{metrics_path}: no evaluation at the best step {best}")


def with_train_loss(rows: Sequence[Row]) -> List[Row]:
    """The rows with ``train_loss`` (:func:`best_train_loss` of each run)."""
    return [{**row, "train_loss": best_train_loss(run_dir_of(row))} for row in rows]


def select(rows: Sequence[Row], series: Sequence[Tuple[str, str]]) -> List[Row]:
    """The rows of the given (backbone, mode) series.

    Raises:
        ValueError: a series without rows (the message lists what the studies hold).
    """
    held = sorted({(r["backbone"], r["mode"]) for r in rows})
    for backbone, mode in series:
        if (backbone, mode) not in held:
            raise ValueError(f"the studies hold no {backbone} {mode} runs (they hold "
                             f"{', '.join(f'{b} {m}' for b, m in held) or 'none'})")
    return [r for r in rows if (r["backbone"], r["mode"]) in set(series)]


def scale_means(rows: Sequence[Row], metric: str) -> Dict[str, Dict[str, List[float]]]:
    """``{"backbone mode": {"scales": [...], "mean": [...], "min": [...], "max": [...], "seeds": [...]}}`` of
    ``metric`` over seeds.

    Example::

        >>> rows = [{"backbone": "dnn", "mode": "se", "scale": s, "seed": k, "ia_mean": s + k}
        ...         for s in (1, 2) for k in (0, 1)]
        >>> scale_means(rows, "ia_mean")["dnn se"]["mean"]
        [1.5, 2.5]
    """
    cells: Dict[Tuple[str, str], Dict[int, List[float]]] = {}
    for row in rows:
        cells.setdefault((row["backbone"], row["mode"]), {}).setdefault(int(row["scale"]), []).append(
            float(row[metric]))
    result = {}
    for (backbone, mode), by_scale in cells.items():
        scales = sorted(by_scale)
        result[f"{backbone} {mode}"] = {
            "scales": scales,
            "mean": [float(np.mean(by_scale[s])) for s in scales],
            "min": [float(min(by_scale[s])) for s in scales],
            "max": [float(max(by_scale[s])) for s in scales],
            "seeds": [len(by_scale[s]) for s in scales],
        }
    return result


def scale_csv(rows: Sequence[Row], metrics: Sequence[str]) -> str:
    """One line per run: backbone, mode, scale, seed and ``metrics``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("backbone", "mode", "scale", "seed", *metrics))
    for row in rows:
        writer.writerow((row["backbone"], row["mode"], row["scale"], row["seed"],
                         *(f"{float(row[m]):.6f}" for m in metrics)))
    return out.getvalue()


def plot_scale_panels(rows: Sequence[Row], metrics: Sequence[str], path: Path, title: str,
                      labels: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """One panel per metric against the scale (log axis), one line per (backbone, mode) series: mean over seeds,
    min-max band. ``labels`` renames series (``"backbone mode"`` -> legend text). Returns the data drawn."""
    from matplotlib.figure import Figure

    from multiembed.analysis.report import save_figure

    fig = Figure(figsize=(4.4 * len(metrics), 3.6))
    fig.subplots_adjust(wspace=0.35)
    drawn: Dict[str, Any] = {}
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        series = scale_means(rows, metric)
        for name, values in series.items():
            line = ax.plot(values["scales"], values["mean"], marker="o", label=(labels or {}).get(name, name))[0]
            ax.fill_between(values["scales"], values["min"], values["max"], color=line.get_color(), alpha=0.15,
                            linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks(sorted({s for v in series.values() for s in v["scales"]}))
        ax.get_xaxis().set_major_formatter(_scale_formatter())
        ax.set_xlabel("scale")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        if k == 0:
            ax.legend(fontsize=8)
        drawn[metric] = series
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return drawn


def _scale_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}x")


def write_scale_figure(rows: Sequence[Row], metrics: Sequence[str], out: Path, name: str, title: str,
                       labels: Optional[Mapping[str, str]] = None,
                       extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Writes ``{name}.csv`` (one line per run), ``{name}.json`` (the means per scale, plus ``extra``) and
    ``{name}.png`` (:func:`plot_scale_panels`); returns the JSON's content."""
    from multiembed.data.metadata import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.csv", scale_csv(rows, metrics))
    drawn = plot_scale_panels(rows, metrics, out / f"{name}.png", title, labels)
    record = {"means": drawn, **(extra or {}), "data": f"{name}.csv", "figure": f"{name}.png"}
    atomic_write_text(out / f"{name}.json", json.dumps(record, indent=1) + "\n")
    return record


# ------------------------------------------------------------------------------------------------------- Fig. 8
def norm_spread(norms: np.ndarray) -> float:
    r"""How differently the sets weigh the field pairs: the mean over pairs ``(i, j)`` of the coefficient of
    variation over sets, :math:`\mathrm{std}_m / \mathrm{mean}_m` of :math:`\lVert W^{(m)}_{i\to j}\rVert_F`
    (population std; 0 when every set has the same norms).

    Args:
        norms: ``[K, F, F]``.

    Example::

        >>> norm_spread(np.array([[[1.0]], [[3.0]]]))  # std 1, mean 2
        0.5
    """
    if norms.ndim != 3 or norms.shape[0] < 2:
        raise ValueError(f"norm_spread: expected [K >= 2, F, F], got {norms.shape}")
    return float((norms.std(axis=0) / np.maximum(norms.mean(axis=0), 1e-12)).mean())


def plot_fig8(panels: Mapping[str, Any], rows: Sequence[Row], path: Path, labels: Mapping[str, str]) -> None:
    """The paper's four panels: (a) whole-embedding IA per field, SE and ME; (b) ME's IA per set and field;
    (c) ``||W^(m)_{i->j}||_F`` of each set (flattened field pairs, one line per set); (d) test AUC against the
    scale."""
    from matplotlib.figure import Figure

    from multiembed.analysis.report import save_figure

    fig = Figure(figsize=(18.0, 3.8))
    fig.subplots_adjust(wspace=0.32)
    fields = panels["fields"]
    x = np.arange(len(fields))
    ax = fig.add_subplot(1, 4, 1)
    ax.bar(x - 0.2, [panels["ia_whole"]["se"][f] for f in fields], 0.4, label="SE")
    ax.bar(x + 0.2, [panels["ia_whole"]["me"][f] for f in fields], 0.4, label="ME")
    ax.set_xticks(x, fields, rotation=90, fontsize=7)
    ax.set_ylabel("IA of the whole embedding")
    ax.set_title(f"(a) IA, {panels['scale']}x", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 4, 2)
    for m, per_field in enumerate(panels["ia_per_set"]):
        ax.plot(x, [per_field[f] for f in fields], marker=".", linewidth=0.8, label=f"set {m}")
    ax.set_xticks(x, fields, rotation=90, fontsize=7)
    ax.set_ylabel("IA per set")
    ax.set_title("(b) ME: IA of each set", fontsize=9)
    ax = fig.add_subplot(1, 4, 3)
    for m, norms in enumerate(panels["norms"]):
        ax.plot(np.asarray(norms).reshape(-1), linewidth=0.8, label=f"set {m}")
    ax.set_xlabel("field pair (i, j), row-major")
    ax.set_ylabel("||W(m)_i->j||_F")
    ax.set_title(f"(c) ME: cross maps per set (spread {panels['norm_spread']:.3f})", fontsize=9)
    ax = fig.add_subplot(1, 4, 4)
    for name, values in scale_means(rows, "test_auc").items():
        ax.plot(values["scales"], values["mean"], marker="o", label=labels.get(name, name))
    ax.set_xscale("log")
    ax.set_xticks(sorted({int(r["scale"]) for r in rows}))
    ax.get_xaxis().set_major_formatter(_scale_formatter())
    ax.set_xlabel("scale")
    ax.set_ylabel("test AUC")
    ax.set_title("(d) scaling, with the divergence penalty", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def run_option(run_dir: Path, name: str) -> Any:
    """An option as the run's ``config.json`` recorded it (:func:`~multiembed.config.recorded_option`).

    Raises:
        ValueError: ``config.json`` missing or unreadable (the message names it).
    """
    from multiembed.config import recorded_option

    path = Path(run_dir) / "config.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return recorded_option(record["options"], name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the run's options ({e})") from None


def ablation_rows(study: Path) -> List[Row]:
    """The ``me-dr`` rows of one ablation study, their mode renamed ``me-dr MU`` with ``MU`` the runs'
    ``divergence_reg`` (so that several studies, one weight each, can be drawn side by side).

    Raises:
        ValueError: no ``me-dr`` runs, or runs of different weights in one study.
    """
    rows = [r for r in read_study_rows([study], {"me-dr": "divergence_reg"}) if r.get("run_mode") == "me-dr"]
    if not rows:
        raise ValueError(f"{study}: holds no me-dr runs (a multiembed scale --modes me-dr study)")
    weights = {r["weight"] for r in rows}
    if len(weights) != 1:
        raise ValueError(f"{study}: its me-dr runs trained with different --divergence-reg {sorted(weights)}")
    return [{**r, "divergence_reg": r["weight"]} for r in rows]


def cross_norms(run_dir: Path, ctx: Any, device: str = "cpu") -> np.ndarray:
    """``[K, F, F]``: ``||W^(m)_{i->j}||_F`` of the first cross layer of a DCNv2 run's best checkpoint."""
    from multiembed.analysis.analyze import trained_model
    from multiembed.models.regularizers import field_pair_norms
    from multiembed.training.evaluation import model_for_run

    run = model_for_run(Path(run_dir), device=device, ctx=ctx)
    run.load()
    model = trained_model(run)
    weight = model.set_arch.cross_weights(0)[:, : model.sparse_arch.num_fields * model.sparse_arch.set_dim,
                                             : model.sparse_arch.num_fields * model.sparse_arch.set_dim]
    return field_pair_norms(weight.cpu().double(), model.sparse_arch.set_dim).numpy()


def _row_at(rows: Sequence[Row], backbone: str, mode: str, scale: int, seed: int) -> Row:
    for row in rows:
        if (row["backbone"], row.get("run_mode", row["mode"]), row["scale"], row["seed"]) == (backbone, mode, scale,
                                                                                                seed):
            return row
    raise ValueError(f"the studies hold no {backbone}-{mode}-{scale}x-seed{seed} run")


def fig8_panels(rows: Sequence[Row], ablations: Sequence[Sequence[Row]], scale: int, ctx: Any,
                backbone: str = "dcnv2", device: str = "cpu") -> Dict[str, Any]:
    """The data of Fig. 8 (a)-(c) at ``scale`` (seed 0 for the per-field panels) and the norm spread of every ME
    and ``me-dr`` run at that scale (mean over seeds)."""
    from multiembed.analysis.report import read_collapse_json

    se, me = _row_at(rows, backbone, "se", scale, 0), _row_at(rows, backbone, "me", scale, 0)
    collapse_se = read_collapse_json(run_dir_of(se) / "collapse.json")
    collapse_me = read_collapse_json(run_dir_of(me) / "collapse.json")
    fields = list(collapse_me["fields"])
    whole = {"se": collapse_se.get("concat") or collapse_se["sets"][0], "me": collapse_me["concat"]}
    norms = cross_norms(run_dir_of(me), ctx, device)
    spreads: Dict[str, Dict[str, Any]] = {}
    for group in (list(rows), *ablations):
        for row in group:
            if row.get("run_mode", row["mode"]) in ("me", "me-dr") and row["scale"] == scale:
                entry = spreads.setdefault(row["mode"], {"seeds": [], "spread": []})
                entry["seeds"].append(int(row["seed"]))
                entry["spread"].append(norm_spread(cross_norms(run_dir_of(row), ctx, device)))
    for entry in spreads.values():
        entry["mean"] = float(np.mean(entry["spread"]))
    return {
        "scale": scale,
        "fields": fields,
        "ia_whole": {k: {f: float(v[f]) for f in fields} for k, v in whole.items()},
        "ia_per_set": [{f: float(per_set[f]) for f in fields} for per_set in collapse_me["sets"]],
        "norms": norms.tolist(),
        "norm_spread": norm_spread(norms),
        "norm_spread_by_mode": spreads,
    }


def write_fig8(rows: Sequence[Row], ablations: Sequence[Sequence[Row]], scale: int, out: Path, ctx: Any,
               backbone: str = "dcnv2", device: str = "cpu") -> Dict[str, Any]:
    """Writes ``fig8.csv`` (test AUC and IA per run of SE, ME and every ablation), ``fig8.json`` (the panels' data,
    the AUC means per scale) and ``fig8.png``; returns the JSON's content."""
    from multiembed.data.metadata import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    series = [r for r in rows if r["backbone"] == backbone and r["mode"] in ("se", "me")]
    every = [*series, *(r for group in ablations for r in group)]
    panels = fig8_panels(rows, ablations, scale, ctx, backbone, device)
    labels = {f"{backbone} se": "SE", f"{backbone} me": "ME",
              **{f"{backbone} {r['mode']}": f"ME, divergence penalty mu={r['divergence_reg']:g}"
                 for group in ablations for r in group}}
    atomic_write_text(out / "fig8.csv", scale_csv(every, ("test_auc", "val_auc", "ia_mean", "ia_concat_mean")))
    plot_fig8(panels, every, out / "fig8.png", labels)
    record = {"panels": panels, "test_auc": scale_means(every, "test_auc"), "labels": labels, "data": "fig8.csv",
              "figure": "fig8.png"}
    atomic_write_text(out / "fig8.json", json.dumps(record, indent=1) + "\n")
    return record


__all__ = [
    "FIG5_MODES", "METRIC_LABELS", "SubEmbeddingView", "best_train_loss", "fig5_label", "fig5_rows", "mean_view",
    "norm_spread", "plot_fig3", "plot_fig8", "tercile_means",
    "plot_scale_panels", "rank_correlation", "read_study_rows", "run_dir_of", "scale_csv", "scale_means", "select",
    "sub_embedding_view", "with_train_loss", "write_fig3", "write_scale_figure", "ablation_rows", "cross_norms",
    "fig8_panels", "run_option", "write_fig8",
]
