"""The production loop's results (``multiembed days``, :mod:`multiembed.training.days`) as a table and a plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

from multiembed.analysis.report import save_figure


def format_days(summary: Mapping[str, Any]) -> str:
    """One line per finished day: progressive-validation AUC (before training on the day), AUC after (the day's
    test split), the Bayes-optimal AUC when the day is synthetic, rows and new ids."""
    lines: List[str] = [
        f"{'day':>4}  {'pv AUC':>8}  {'pv logloss':>10}  {'AUC after':>9}  {'Bayes':>7}  {'rows':>9}  {'new ids':>8}"
    ]
    for day in summary["days"]:
        bayes = day.get("bayes_pv_auc")
        lines.append(
            f"{day['day']:>4}  {day['pv_auc']:>8.5f}  {day['pv_logloss']:>10.5f}  {day['auc_after']:>9.5f}  "
            f"{'-' if bayes is None else f'{bayes:.5f}':>7}  {day['rows']:>9}  {day['new_ids']:>8}"
        )
    return "\n".join(lines)


def plot_days(summary: Mapping[str, Any], path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """AUC per day: progressive validation (before training on the day), after training, and Bayes-optimal.

    Returns:
        The plotted series, ``{"day": [...], "pv_auc": [...], "auc_after": [...], "bayes_pv_auc": [...]}``.
    """
    from matplotlib.figure import Figure

    days = summary["days"]
    series: Dict[str, Any] = {
        "day": [d["day"] for d in days],
        "pv_auc": [d["pv_auc"] for d in days],
        "auc_after": [d["auc_after"] for d in days],
        "bayes_pv_auc": [d.get("bayes_pv_auc") for d in days],
    }
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(series["day"], series["pv_auc"], "o-", label="progressive validation (before the day)")
    ax.plot(series["day"], series["auc_after"], "s--", label="after the day (its test split)")
    if all(b is not None for b in series["bayes_pv_auc"]):
        ax.plot(series["day"], series["bayes_pv_auc"], ":", color="gray", label="Bayes-optimal (the day's train rows)")
    ax.set_xlabel("day")
    ax.set_ylabel("AUC")
    ax.set_title(f"{summary.get('model', '')}: AUC per day")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
    return series
