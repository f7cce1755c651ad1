"""Evaluation metrics over all ranks with ``torchrec.metrics``: AUC, log loss, NE, calibration.

Padding rows (weight 0, added so every rank runs the same number of batches) carry no weight in any metric, so an
evaluation covers every row of the split exactly once.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.distributed as dist
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum, RecTaskInfo

from multiembed.training.distributed import all_reduce_sum, broadcast_object

_TASK = RecTaskInfo(name="ctr", label_name="label", prediction_name="prediction", weight_name="weight")


class EvalMetrics:
    """Accumulates predictions of one evaluation pass and computes global metrics.

    Args:
        rows_per_rank: the most rows any rank feeds (padding included); sizes AUC's window so it spans the pass.
        batch_size: per-rank batch size.
        world_size: ranks in the process group.
        rank: this rank.
        device: where metric state lives.

    Example::

        metrics = EvalMetrics(rows_per_rank=8, batch_size=4, world_size=1, rank=0, device=torch.device("cpu"))
        metrics.update(torch.tensor([0.1, 2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.ones(4))
        result = metrics.compute()  # {"auc": 1.0, "logloss": ..., "ne": ..., "calibration": ..., "rows": 4}
    """

    def __init__(self, rows_per_rank: int, batch_size: int, world_size: int, rank: int, device: torch.device) -> None:
        if rows_per_rank < 1 or batch_size < 1:
            raise ValueError(f"rows_per_rank and batch_size must be >= 1, got {rows_per_rank}, {batch_size}")
        # torchrec's AUC keeps a window of raw predictions: make it the whole pass (global size = per rank x ranks).
        window = max(rows_per_rank, batch_size) * world_size
        config = MetricsConfig(
            rec_tasks=[_TASK],
            rec_metrics={
                RecMetricEnum.AUC: RecMetricDef(rec_tasks=[_TASK], window_size=window),
                RecMetricEnum.NE: RecMetricDef(
                    rec_tasks=[_TASK], window_size=window, arguments={"include_logloss": True}
                ),
                RecMetricEnum.CALIBRATION: RecMetricDef(rec_tasks=[_TASK], window_size=window),
            },
            throughput_metric=None,
            state_metrics=[],
        )
        self._module: RecMetricModule = generate_metric_module(
            RecMetricModule,
            config,
            batch_size=batch_size,
            world_size=world_size,
            my_rank=rank,
            state_metrics_mapping={},
            device=device,
            process_group=dist.group.WORLD if dist.is_initialized() else None,
        )
        self._weight_sum = torch.zeros((), dtype=torch.float64)
        self._device = device

    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """Adds one batch: ``logits``, ``labels`` and ``weights`` all of shape [B]."""
        self._module.update(
            {
                "prediction": torch.sigmoid(logits.detach().float()),
                "label": labels.detach().float(),
                "weight": weights.detach().float(),
            }
        )
        self._weight_sum += weights.detach().double().sum().cpu()

    def compute(self) -> Dict[str, float]:
        """Global metrics (a collective: every rank must call it).

        Returns:
            ``{"auc", "logloss" (natural log, as CTR papers report it), "ne", "calibration", "rows"}``.
        """
        raw = self._module.compute()
        values = {key.split("|", 1)[1]: float(value) for key, value in raw.items()}
        rows = all_reduce_sum(self._weight_sum.clone())
        # torchrec gathers AUC's raw predictions on rank 0 only: share rank 0's results with every rank.
        values = broadcast_object(values)
        return {
            "auc": values["window_auc"],
            # torchrec reports log loss in bits (log2); CTR papers use nats.
            "logloss": values["lifetime_logloss"] * math.log(2.0),
            "ne": values["lifetime_ne"],
            "calibration": values["lifetime_calibration"],
            "rows": int(round(float(rows))),
        }

