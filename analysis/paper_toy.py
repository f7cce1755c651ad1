"""The paper's toy experiment (its Figure 4): a field that interacts with a low-information field collapses.

Three fields: ``x1`` and ``x2`` with 100 values each, every ``(x1, x2)`` pair exactly once (10,000 samples), and
``x3`` drawn uniformly from ``D3`` values; labels are Bernoulli(0.5), so nothing is learnable and only the geometry
of the interaction shapes the embeddings. The model is a factorisation machine over the three embeddings (width
``d = 10``)::

    logit = <e1, e2> + <e1, e3> + <e2, e3>

trained with the mean binary cross-entropy by full-batch gradient descent (lr 1) on ``E1`` alone; ``E2`` and ``E3``
stay at their N(0, 1) initialisation. The paper's interaction-collapse law predicts that ``E1`` loses information
abundance (IA) when it interacts with a field of few values (``D3 = 3``: ``E3`` spans at most 3 dimensions) and
keeps it when ``D3 = 100``.

The gradient is computed in closed form on the ``[100, 100]`` grid of ``(x1, x2)`` (autograd over 10,000 gathered
rows gives the same numbers at many times the cost): with ``S[i, j] = E2[j] + E3[x3[i, j]]``,
``dL/dE1[i] = sum_j (sigmoid(logit[i, j]) - y[i, j]) S[i, j] / 10,000``.

Example::

    >>> curve = toy_ia_curve(d3=3, seed=0, iterations=20, every=10)
    >>> [point.iteration for point in curve]
    [0, 10, 20]
    >>> 1.0 <= curve[-1].ia <= 10.0
    True
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from multiembed.collapse import information_abundance, singular_values

FIELD_VALUES = 100
WIDTH = 10
LEARNING_RATE = 1.0
# The paper's two settings of the third field's vocabulary.
D3_VALUES: Tuple[int, ...] = (3, 100)
CSV_COLUMNS = ("seed", "d3", "iteration", "ia", "loss")


@dataclass(frozen=True)
class ToyPoint:
    """IA of ``E1`` (rows L2-normalised, as the paper's analysis code does) and the loss at one iteration."""

    seed: int
    d3: int
    iteration: int
    ia: float
    loss: float


def _toy_problem(d3: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen part of the problem, drawn from ``seed``: ``(E1 init [100, d], S [100, 100, d], c [100, 100],
    y [100, 100])`` with ``c[i, j] = <E2[j], E3[x3[i, j]]>`` (the logit's term without ``E1``)."""
    generator = torch.Generator().manual_seed(seed)
    n = FIELD_VALUES
    # Drawn as the 10,000-sample list, sample k = (x1 = k // 100, x2 = k % 100), then viewed as the grid.
    x3 = torch.randint(0, d3, (n * n,), generator=generator).view(n, n)
    labels = torch.bernoulli(torch.full((n * n,), 0.5), generator=generator).to(torch.float64).view(n, n)
    e1 = torch.randn(n, WIDTH, generator=generator, dtype=torch.float64)
    e2 = torch.randn(n, WIDTH, generator=generator, dtype=torch.float64)
    e3 = torch.randn(d3, WIDTH, generator=generator, dtype=torch.float64)
    partner = e2.unsqueeze(0) + e3[x3]  # [i, j, d]: what e1 row i meets in sample (i, j)
    constant = (e2.unsqueeze(0) * e3[x3]).sum(-1)
    return e1, partner, constant, labels


def toy_ia_curve(d3: int, seed: int, iterations: int = 5000, every: int = 50) -> List[ToyPoint]:
    """Trains ``E1`` of the toy FM and records its IA every ``every`` iterations (and at the last).

    Args:
        d3: values of the third field (the paper: 3 or 100).
        seed: draws ``x3``, the labels and the three initial tables.
        iterations: gradient steps.
        every: recording interval in steps.

    Returns:
        one :class:`ToyPoint` per recorded iteration, from 0 to ``iterations``.
    """
    if d3 < 1 or iterations < 0 or every < 1:
        raise ValueError(f"toy_ia_curve: need d3 >= 1, iterations >= 0 and every >= 1, got {d3}, {iterations}, {every}")
    e1, partner, constant, labels = _toy_problem(d3, seed)
    samples = labels.numel()
    points = []
    for step in range(iterations + 1):
        logits = torch.einsum("id,ijd->ij", e1, partner) + constant
        if step % every == 0 or step == iterations:
            loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
            points.append(ToyPoint(seed, d3, step, information_abundance(singular_values(e1)), loss))
        if step < iterations:
            residual = torch.sigmoid(logits) - labels
            e1 = e1 - LEARNING_RATE * torch.einsum("ij,ijd->id", residual, partner) / samples
    return points


def run_toy(seeds: Sequence[int], iterations: int = 5000, every: int = 50) -> List[ToyPoint]:
    """:func:`toy_ia_curve` for every seed and both of the paper's ``D3`` values."""
    return [point for seed in seeds for d3 in D3_VALUES for point in toy_ia_curve(d3, seed, iterations, every)]


def ia_at(points: Sequence[ToyPoint], iteration: int) -> Dict[Tuple[int, int], float]:
    """``{(seed, d3): IA}`` at one recorded iteration."""
    found = {(p.seed, p.d3): p.ia for p in points if p.iteration == iteration}
    if not found:
        raise ValueError(f"ia_at: iteration {iteration} was not recorded")
    return found


def summarize(points: Sequence[ToyPoint], iteration: int) -> Dict[str, Any]:
    """IA per seed and ``D3`` at ``iteration``, and the per-seed gap ``IA(D3=100) - IA(D3=3)``."""
    values = ia_at(points, iteration)
    seeds = sorted({seed for seed, _ in values})
    gaps = {seed: values[(seed, 100)] - values[(seed, 3)] for seed in seeds if (seed, 3) in values and (seed, 100) in values}
    return {
        "iteration": iteration,
        "ia": {f"d3={d3}": {str(seed): values[(seed, d3)] for seed in seeds if (seed, d3) in values} for d3 in D3_VALUES},
        "gap_d3_100_minus_3": {str(seed): gap for seed, gap in gaps.items()},
        "min_gap": min(gaps.values()) if gaps else None,
    }


def points_csv(points: Sequence[ToyPoint]) -> str:
    """The curve as CSV text with the header :data:`CSV_COLUMNS`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in points:
        writer.writerow([p.seed, p.d3, p.iteration, f"{p.ia:.6f}", f"{p.loss:.6f}"])
    return out.getvalue()


def read_points_csv(path: Path) -> List[ToyPoint]:
    """Reads :func:`points_csv`'s file back (a figure can be redrawn from it without training)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: expected columns {', '.join(CSV_COLUMNS)}, got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append(ToyPoint(int(row["seed"]), int(row["d3"]), int(row["iteration"]), float(row["ia"]),
                                     float(row["loss"])))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {line}: cannot parse {row}") from None
    return rows


def plot_toy(points: Sequence[ToyPoint], path: Path) -> Dict[str, Any]:
    """IA of ``E1`` against iterations, one line per ``D3`` (mean over seeds, min-max band), as in the paper.

    Returns:
        ``{"d3=3": {"iterations": [...], "mean": [...]}, ...}``: the data drawn.
    """
    from matplotlib.figure import Figure

    from multiembed.analysis.report import save_figure

    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    drawn: Dict[str, Any] = {}
    for d3, colour in zip(D3_VALUES, ("tab:red", "tab:blue")):
        by_iteration: Dict[int, List[float]] = {}
        for p in points:
            if p.d3 == d3:
                by_iteration.setdefault(p.iteration, []).append(p.ia)
        steps = sorted(by_iteration)
        mean = [sum(by_iteration[s]) / len(by_iteration[s]) for s in steps]
        ax.plot(steps, mean, color=colour, label=f"$D_3$ = {d3}")
        ax.fill_between(steps, [min(by_iteration[s]) for s in steps], [max(by_iteration[s]) for s in steps],
                        color=colour, alpha=0.2, linewidth=0)
        drawn[f"d3={d3}"] = {"iterations": steps, "mean": mean}
    ax.set_xlabel("iteration")
    ax.set_ylabel("IA($E_1$)")
    ax.set_title("Toy FM: only $E_1$ trained, labels random")
    ax.legend()
    save_figure(fig, path)
    return drawn


def write_toy_report(points: Sequence[ToyPoint], out: Path, check_iteration: int) -> Dict[str, Any]:
    """Writes ``toy.csv`` (every point), ``toy.json`` (the summary at ``check_iteration`` and at the end) and
    ``toy.png`` into ``out``; returns the JSON's content."""
    from multiembed.data.metadata import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    last = max(p.iteration for p in points)
    atomic_write_text(out / "toy.csv", points_csv(points))
    plot_toy(points, out / "toy.png")
    record = {
        "setup": {"field_values": FIELD_VALUES, "width": WIDTH, "learning_rate": LEARNING_RATE,
                  "d3": list(D3_VALUES), "seeds": sorted({p.seed for p in points}), "iterations": last,
                  "ia_rows_normalized": True},
        "at_check": summarize(points, check_iteration),
        "at_end": summarize(points, last),
        "data": "toy.csv",
        "figure": "toy.png",
    }
    atomic_write_text(out / "toy.json", json.dumps(record, indent=1) + "\n")
    return record


__all__ = ["ToyPoint", "toy_ia_curve", "run_toy", "summarize", "write_toy_report", "read_points_csv", "plot_toy",
           "points_csv", "ia_at"]
