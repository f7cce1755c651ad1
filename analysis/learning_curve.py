"""Learning curves: validation AUC against rows trained, read from runs' ``metrics.jsonl``, as a CSV and a PNG.

A run on a stream dataset (``multiembed synth --stream``) trains every row once, so its curve says how many fresh rows
a model needs: the row budget of a study on such data is chosen from it (docs/results/fresh-rows/).

Usage::

    python -m multiembed.analysis.learning_curve RUN [RUN ...] --out DIR

writes ``DIR/learning_curve.csv`` (one line per evaluation: run, model, seed, step, rows, val AUC, val log loss, train
loss, Bayes-optimal val AUC) and ``DIR/learning_curve.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from multiembed.data.metadata import atomic_write, atomic_write_text

CURVE_CSV = "learning_curve.csv"
CURVE_PNG = "learning_curve.png"
COLUMNS = ("run", "model", "seed", "step", "rows", "val_auc", "val_logloss", "train_loss", "bayes_val_auc")


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def curve_rows(run_dir: Path, bayes_val_auc: Optional[float] = None) -> List[Dict[str, Any]]:
    """One row per evaluation of a run (its ``config.json`` and ``metrics.jsonl``), rows = step x global batch.

    Raises:
        ValueError: not a run directory, or a line of ``metrics.jsonl`` that is not JSON (file and line named).
    """
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    options = config.get("options", {})
    batch = int(options["batch_size"])
    out = []
    metrics = run_dir / "metrics.jsonl"
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{metrics}: unreadable ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{metrics}: line {number}: not JSON ({e})") from None
        out.append({
            "run": run_dir.name, "model": options.get("model"), "seed": options.get("seed"),
            "step": int(record["step"]), "rows": int(record["step"]) * batch, "val_auc": record["val_auc"],
            "val_logloss": record.get("val_logloss"), "train_loss": record.get("train_loss"),
            "bayes_val_auc": bayes_val_auc,
        })
    return out


def write_curve_csv(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Writes the rows as CSV (:data:`COLUMNS`), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in COLUMNS})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def read_curve_csv(path: Path) -> List[Dict[str, Any]]:
    """The rows of a ``learning_curve.csv`` (numbers parsed)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("step", "rows"):
            row[key] = int(row[key])
        for key in ("val_auc", "val_logloss", "train_loss", "bayes_val_auc"):
            row[key] = float(row[key]) if row[key] not in ("", None) else None
    return rows


def plot_curves(rows: Sequence[Dict[str, Any]], path: Path) -> Dict[str, Dict[str, List[float]]]:
    """``learning_curve.png``: validation AUC against rows trained, one line per run, with the Bayes-optimal AUC
    dashed; returns what was drawn (``{run: {"rows": [...], "val_auc": [...]}}``).

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("plot_curves: no rows")
    series: Dict[str, Dict[str, List[float]]] = {}
    for row in rows:
        label = row["run"] if row["run"] == row["model"] else f"{row['run']} ({row['model']})"
        entry = series.setdefault(label, {"rows": [], "val_auc": []})
        entry["rows"].append(row["rows"])
        entry["val_auc"].append(row["val_auc"])
    fig = Figure(figsize=(8.0, 4.8), layout="constrained")
    ax = fig.subplots()
    for label, data in series.items():
        ax.plot(data["rows"], data["val_auc"], marker=".", label=label)
    bayes = {row["bayes_val_auc"] for row in rows if row.get("bayes_val_auc") is not None}
    if len(bayes) == 1:
        ax.axhline(bayes.pop(), color="grey", linestyle="--", label="Bayes-optimal val AUC")
    ax.set_xlabel("rows trained (each row once: a stream dataset)")
    ax.set_ylabel("validation AUC")
    ax.set_title("Learning curve on fresh rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return series


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m multiembed.analysis.learning_curve RUN ... --out DIR [--bayes-val-auc X]``."""
    parser = argparse.ArgumentParser(prog="python -m multiembed.analysis.learning_curve", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (multiembed train --out)")
    parser.add_argument("--out", required=True, help="where learning_curve.csv and learning_curve.png go")
    parser.add_argument("--bayes-val-auc", type=float, default=None,
                        help="the data's Bayes-optimal validation AUC (its metadata.json), drawn dashed")
    args = parser.parse_args(argv)
    try:
        rows = [row for run in args.runs for row in curve_rows(Path(run), args.bayes_val_auc)]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_curve_csv(rows, out / CURVE_CSV)
        plot_curves(rows, out / CURVE_PNG)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} evaluations of {len(args.runs)} runs -> {out / CURVE_CSV}, {out / CURVE_PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
