"""Offline binary-classification metrics over whole arrays: exact ROC AUC and log loss, numpy only.

The one home of these metrics outside training (the Bayes-optimal metrics of synthetic data, ``multiembed predict``,
the parity and stack benchmarks, the tests); training's streaming metrics are TorchRec's
(``multiembed.training.metrics``). ``data/`` imports nothing but numpy and pyarrow, so no sklearn here.
"""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with mid-ranks for ties).

    Example::

        >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8])
        0.875

    Raises:
        ValueError: ``labels`` holds only one class.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # Mid-rank of every tie group: ranks start..end (1-based) share (start + end) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], sorted_scores.shape[0]]
    group_ranks = (starts + 1 + ends) / 2.0
    ranks = np.repeat(group_ranks, ends - starts)
    pos_rank_sum = float(ranks[labels[order]].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (nats) of ``probs`` (clipped to ``[eps, 1 - eps]``) against ``labels``.

    Example::

        >>> round(log_loss([0, 1], [0.5, 0.5]), 6)
        0.693147
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())
