"""Collapse reports: ``collapse.json`` and the figures of the paper's collapse analysis.

Everything here reads the dict form of :class:`multiembed.collapse.CollapseResult` (what ``collapse.json``
holds), so a report can be redrawn from a saved file without a model. Figures are drawn with matplotlib's
object-oriented API on the Agg canvas (no pyplot state, no display needed) and written atomically (temporary name,
then rename). Every plotting function returns the arrays it drew, so tests and callers can check the figure's data.

Files written by :func:`write_collapse_report`:

- ``collapse.json``: the metrics (keys ``row_normalized``, ``dim``, ``sets``, ``concat``, ``random_init``,
  ``sub_embedding`` and more, see :meth:`CollapseResult.to_dict`).
- ``spectra.png``: per-field normalised singular values ``s_k / s_1`` as a heat map, one panel per set (and one for
  the sets concatenated), fields sorted by vocabulary size.
- ``ia_vs_random.png``: IA per field (mean over sets, min-max whiskers) next to a random table's IA.
- ``ia_sets.png``: IA per set (mean and min over fields) and, per field, the IA of the whole field embedding (SE: its
  one table; ME: its sets concatenated), for one model or an SE / ME pair.
- ``sub_embedding.png`` (DCNv2 only): IA of field ``i`` as seen by field ``j`` through the first cross layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from multiembed.collapse import CollapseResult, summarize_sets
from multiembed.data.metadata import atomic_write, atomic_write_text

COLLAPSE_JSON = "collapse.json"
SPECTRA_PNG = "spectra.png"
IA_VS_RANDOM_PNG = "ia_vs_random.png"
IA_SETS_PNG = "ia_sets.png"
SUB_EMBEDDING_PNG = "sub_embedding.png"

REQUIRED_KEYS = ("row_normalized", "dim", "fields", "vocab_sizes", "sets", "spectra", "concat", "random_init",
                 "sub_embedding")

CollapseLike = Union[CollapseResult, Mapping[str, Any]]


def _as_dict(collapse: CollapseLike, where: str = "collapse result") -> Dict[str, Any]:
    data = collapse.to_dict() if isinstance(collapse, CollapseResult) else dict(collapse)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{where}: missing keys {missing} (expected the output of CollapseResult.to_dict)")
    for k, ia in enumerate(data["sets"]):
        if list(ia) != list(data["fields"]):
            raise ValueError(f"{where}: set {k} lists fields {list(ia)}, expected {data['fields']}")
    return data


def write_collapse_json(collapse: CollapseLike, path: Union[str, os.PathLike]) -> Path:
    """Writes ``collapse.json`` atomically.

    Args:
        collapse: a :class:`CollapseResult` or its dict.
        path: the file to write.

    Returns:
        the path written.
    """
    data = _as_dict(collapse)
    data.setdefault("set_summary", summarize_sets(data["sets"]))
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


def read_collapse_json(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Reads a ``collapse.json``; a malformed file raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return _as_dict(data, where=str(path))


def save_figure(fig: Figure, path: Union[str, os.PathLike]) -> Path:
    """Writes the figure as PNG under a temporary name, then renames it into place."""
    path = Path(path)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return path


def fields_by_vocab(collapse: CollapseLike) -> List[str]:
    """Fields sorted by vocabulary size, smallest first (ties keep the model's order)."""
    data = _as_dict(collapse)
    order = {f: i for i, f in enumerate(data["fields"])}
    return sorted(data["fields"], key=lambda f: (data["vocab_sizes"][f], order[f]))


def _field_labels(data: Mapping[str, Any], fields: Sequence[str]) -> List[str]:
    return [f"{f} ({_short_count(data['vocab_sizes'][f])})" for f in fields]


def _short_count(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _mode_text(data: Mapping[str, Any]) -> str:
    return "rows L2-normalised" if data["row_normalized"] else "raw rows"


def _tick_size(count: int) -> float:
    return 8.0 if count <= 20 else 6.5 if count <= 45 else 5.0


def _model_label(data: Mapping[str, Any]) -> str:
    k = len(data["sets"])
    return f"SE (d={data['dim']})" if k == 1 else f"ME ({k} sets x d={data['dim']})"


def plot_spectra(collapse: CollapseLike, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Heat map of each field's normalised singular values ``s_k / s_1``, one panel per set (plus the concatenation).

    Args:
        collapse: a :class:`CollapseResult` or its dict.
        path: the PNG to write.

    Returns:
        ``{"fields": [...] (rows, vocabulary ascending), "panels": {title: array [F, width]}}``.
    """
    data = _as_dict(collapse)
    fields = fields_by_vocab(data)
    panels: Dict[str, np.ndarray] = {}
    for k, spectra in enumerate(data["spectra"]):
        panels[f"set {k}" if len(data["spectra"]) > 1 else "single embedding"] = np.array([spectra[f] for f in fields])
    if data.get("concat_spectra"):
        panels[f"{len(data['sets'])} sets concatenated"] = np.array([data["concat_spectra"][f] for f in fields])

    columns = min(6, len(panels))
    rows = -(-len(panels) // columns)
    height = max(3.2, 0.18 * len(fields) + 1.5)
    fig = Figure(figsize=(max(6.0, 3.0 * columns + 1.5), height * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for ax, (title, matrix) in zip(axes.flat, panels.items()):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                          extent=(0.5, matrix.shape[1] + 0.5, len(fields) - 0.5, -0.5))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(r"singular value index $k$")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yticks(range(len(fields)))
        ax.set_yticklabels(_field_labels(data, fields), fontsize=_tick_size(len(fields)))
        ax.set_ylabel("field (by vocabulary size)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, label=r"$s_k / s_1$", shrink=0.8)
    fig.suptitle(f"Normalised singular values per field\n({_mode_text(data)}, d={data['dim']})")
    save_figure(fig, path)
    return {"fields": fields, "panels": panels}


def plot_ia_vs_random(collapse: CollapseLike, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """IA per field (mean over sets, whiskers from min to max) against a random table of the same shape.

    Args:
        collapse: a :class:`CollapseResult` or its dict.
        path: the PNG to write.

    Returns:
        ``{"fields": [...], "mean": [F], "min": [F], "max": [F], "random_init": [F] or None}``.
    """
    data = _as_dict(collapse)
    fields = fields_by_vocab(data)
    per_set = np.array([[s[f] for f in fields] for s in data["sets"]])  # [K, F]
    mean, low, high = per_set.mean(axis=0), per_set.min(axis=0), per_set.max(axis=0)
    random_ia = np.array([data["random_init"][f] for f in fields]) if data["random_init"] else None

    x = np.arange(len(fields))
    width = 0.4 if random_ia is not None else 0.7
    fig = Figure(figsize=(max(6.0, 0.32 * len(fields) + 2.0), 4.2), layout="constrained")
    ax = fig.subplots()
    learned_label = "learned" if per_set.shape[0] == 1 else f"learned, mean over {per_set.shape[0]} sets (min-max)"
    ax.bar(x - (width / 2 if random_ia is not None else 0), mean, width, label=learned_label, color="tab:blue",
           yerr=None if per_set.shape[0] == 1 else np.stack([mean - low, high - mean]), capsize=2)
    if random_ia is not None:
        ax.bar(x + width / 2, random_ia, width, label="random initialisation", color="tab:gray")
    ax.axhline(data["dim"], color="black", linestyle="--", linewidth=0.8, label=f"maximum IA = d = {data['dim']}")
    ax.set_xticks(x)
    ax.set_xticklabels(_field_labels(data, fields), rotation=90, fontsize=_tick_size(len(fields)))
    ax.set_xlabel("field (by vocabulary size)")
    ax.set_ylabel("information abundance")
    ax.set_ylim(0, data["dim"] * 1.12)
    versus = "vs random initialisation" if random_ia is not None else "(random initialisation not computed)"
    ax.set_title(f"IA per field {versus}\n({_model_label(data)}, {_mode_text(data)})")
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)
    return {"fields": fields, "mean": mean, "min": low, "max": high,
            "random_init": random_ia}


def plot_ia_sets(
    collapses: Sequence[CollapseLike], path: Union[str, os.PathLike], labels: Optional[Sequence[str]] = None
) -> Dict[str, Any]:
    """IA per set, and per field the IA of the whole field embedding, for one model or several (e.g. SE vs ME).

    The whole field embedding is what is comparable across SE and ME of one scale: SE's one ``[D_i, s*d]`` table
    against ME's ``K = s`` sets concatenated ``[D_i, K*d]``.

    Args:
        collapses: one or more :class:`CollapseResult` (or dicts) over the same fields.
        path: the PNG to write.
        labels: legend names (default: "SE (d=..)" / "ME (K sets x d=..)").

    Returns:
        ``{"labels": [...], "set_mean": [[K_m]], "set_min": [[K_m]], "fields": [...], "whole": [[F]]}``, one inner
        list per model, fields sorted by the first model's vocabulary sizes.
    """
    datas = [_as_dict(c) for c in collapses]
    if not datas:
        raise ValueError("plot_ia_sets: no collapse results given")
    labels = list(labels) if labels is not None else [_model_label(d) for d in datas]
    if len(labels) != len(datas):
        raise ValueError(f"plot_ia_sets: {len(labels)} labels for {len(datas)} results")
    fields = fields_by_vocab(datas[0])
    for label, d in zip(labels, datas):
        if sorted(d["fields"]) != sorted(fields):
            raise ValueError(
                f"plot_ia_sets: {label!r} has fields {d['fields']}, the first result has {datas[0]['fields']}"
            )
    summaries = [summarize_sets(d["sets"]) for d in datas]
    set_mean = [[s["mean"] for s in summary] for summary in summaries]
    set_min = [[s["min"] for s in summary] for summary in summaries]
    whole = [[_whole_field_ia(d, label)[f] for f in fields] for d, label in zip(datas, labels)]

    fig = Figure(figsize=(max(11.0, 0.3 * len(fields) + 5.0), 4.6), layout="constrained")
    ax_sets, ax_fields = fig.subplots(1, 2, width_ratios=[1, 2.2])
    colours = [f"C{i}" for i in range(len(datas))]
    position = 0
    ticks, tick_labels = [], []
    for label, means, mins, colour in zip(labels, set_mean, set_min, colours):
        x = np.arange(position, position + len(means))
        ax_sets.bar(x, means, 0.8, color=colour, label=f"{label}: mean over fields")
        ax_sets.plot(x, mins, "v", color="black", markersize=5)
        ticks.extend(x)
        tick_labels.extend(f"{k}" for k in range(len(means)))
        position += len(means) + 1
    ax_sets.plot([], [], "v", color="black", label="min over fields")
    ax_sets.set_xticks(ticks)
    ax_sets.set_xticklabels(tick_labels, fontsize=8)
    ax_sets.set_xlabel("embedding set")
    ax_sets.set_ylabel("information abundance")
    ax_sets.set_title("IA per set\n(at most that model's d)")
    ax_sets.legend(fontsize=7)

    x = np.arange(len(fields))
    width = 0.8 / len(datas)
    for m, (label, values, colour) in enumerate(zip(labels, whole, colours)):
        ax_fields.bar(x - 0.4 + width * (m + 0.5), values, width, color=colour, label=label)
    ax_fields.set_xticks(x)
    ax_fields.set_xticklabels(_field_labels(datas[0], fields), rotation=90, fontsize=_tick_size(len(fields)))
    ax_fields.set_xlabel("field (by vocabulary size)")
    ax_fields.set_ylabel("information abundance")
    ax_fields.set_title("IA of the whole field embedding\n(SE: its one table; ME: its sets concatenated)")
    ax_fields.legend(fontsize=8)
    fig.suptitle(f"Embedding collapse per set and per field ({_mode_text(datas[0])})")
    save_figure(fig, path)
    return {"labels": labels, "set_mean": set_mean, "set_min": set_min, "fields": fields, "whole": whole}


def _whole_field_ia(data: Mapping[str, Any], label: str) -> Mapping[str, float]:
    try:
        return CollapseResult.from_dict(data).whole_field()
    except ValueError as e:
        raise ValueError(f"plot_ia_sets: {label!r}: {e}") from e


def plot_sub_embedding(collapse: CollapseLike, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Heat map of sub-embedding IA: row ``i``, column ``j`` is the IA of ``E_i W_{i->j}^T``, one panel per set.

    Args:
        collapse: a :class:`CollapseResult` (or dict) with ``sub_embedding`` (DCNv2).
        path: the PNG to write.

    Returns:
        ``{"fields": [...], "panels": [array [F', F'] per set]}`` in the cross layer's field order.
    """
    data = _as_dict(collapse)
    if not data["sub_embedding"]:
        raise ValueError("plot_sub_embedding: this result has no sub-embedding IA (DCNv2 models only)")
    fields = list(data["sub_embedding"][0]["fields"])
    panels = [np.array(entry["ia"], dtype=float) for entry in data["sub_embedding"]]
    columns = min(2 if len(fields) > 20 else 4, len(panels))
    rows = -(-len(panels) // columns)
    side = max(3.5, 0.16 * len(fields) + 2.0)
    fig = Figure(figsize=(side * columns + 1.0, side * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    labels = _field_labels(data, fields)
    # One colour scale for every set, from the lowest possible IA (1) to the highest value present.
    top = max(float(m.max()) for m in panels)
    for k, (ax, matrix) in enumerate(zip(axes.flat, panels)):
        image = ax.imshow(matrix, cmap="magma", vmin=1.0, vmax=max(top, 1.0 + 1e-9), interpolation="nearest")
        ax.set_title(f"set {k}" if len(panels) > 1 else "sub-embedding IA", fontsize=10)
        ax.set_xticks(range(len(fields)))
        ax.set_xticklabels(labels, rotation=90, fontsize=_tick_size(len(fields)))
        ax.set_yticks(range(len(fields)))
        ax.set_yticklabels(labels, fontsize=_tick_size(len(fields)))
        ax.set_xlabel(r"field $j$ (sees field $i$ through $W_{i \to j}$)")
        ax.set_ylabel(r"field $i$ (embedding table $E_i$)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, label=r"IA of $E_i W_{i \to j}^\top$", shrink=0.8)
    fig.suptitle(f"Sub-embedding IA through the first cross layer\n({_mode_text(data)}, d={data['dim']})")
    save_figure(fig, path)
    return {"fields": fields, "panels": panels}


@dataclass
class CollapseReport:
    """What :func:`write_collapse_report` wrote.

    Attributes:
        files: figure or file name (``"collapse.json"``, ``"spectra"``, ...) -> path.
        figure_data: figure name -> the arrays it drew (the plotting functions' return values).
    """

    files: Dict[str, Path] = field(default_factory=dict)
    figure_data: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def write_collapse_report(
    collapse: CollapseLike,
    out_dir: Union[str, os.PathLike],
    compare_with: Sequence[CollapseLike] = (),
    labels: Optional[Sequence[str]] = None,
) -> CollapseReport:
    """Writes ``collapse.json`` and every figure that applies to ``out_dir``.

    Args:
        collapse: the analysed model's result (or dict).
        out_dir: the folder (created if missing).
        compare_with: other models' results over the same fields (e.g. SE of the same scale) for ``ia_sets.png``.
        labels: legend names for ``[collapse, *compare_with]`` in ``ia_sets.png``.

    Returns:
        the files written and the data of each figure. ``sub_embedding.png`` is written only for results that have
        sub-embedding IA (DCNv2); ``random_init`` absent leaves the random bars out of ``ia_vs_random.png``.

    Example::

        import tempfile, torch
        from types import SimpleNamespace
        from multiembed.analysis.report import write_collapse_report
        from multiembed.collapse import collapse_from_tables

        layout = [SimpleNamespace(table_name="t", field="f", set_index=0, col_start=0, col_stop=8)]
        result = collapse_from_tables({"t": torch.randn(100, 8)}, layout)
        report = write_collapse_report(result, tempfile.mkdtemp())
    """
    data = _as_dict(collapse)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = CollapseReport()
    report.files["collapse.json"] = write_collapse_json(data, out / COLLAPSE_JSON)
    report.figure_data["spectra"] = plot_spectra(data, out / SPECTRA_PNG)
    report.files["spectra"] = out / SPECTRA_PNG
    report.figure_data["ia_vs_random"] = plot_ia_vs_random(data, out / IA_VS_RANDOM_PNG)
    report.files["ia_vs_random"] = out / IA_VS_RANDOM_PNG
    report.figure_data["ia_sets"] = plot_ia_sets([data, *compare_with], out / IA_SETS_PNG, labels)
    report.files["ia_sets"] = out / IA_SETS_PNG
    if data["sub_embedding"]:
        report.figure_data["sub_embedding"] = plot_sub_embedding(data, out / SUB_EMBEDDING_PNG)
        report.files["sub_embedding"] = out / SUB_EMBEDDING_PNG
    return report
