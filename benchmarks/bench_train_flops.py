"""Analytic FLOPs of the set interaction arch and of a training step."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from multiembed.models import (
    BatchedCrossNet,
    BatchedLowRankCrossNet,
    CrossSetArch,
    MultiEmbeddingModel,
    SetInteractionArch,
)


def _linear_flops(batch: int, n: int, m: int) -> int:
    """Forward + backward GEMM FLOPs of ``[batch, n] -> [batch, m]``: ``2 b n m`` forward, twice that backward."""
    return 3 * 2 * batch * n * m


def set_arch_flops(arch: SetInteractionArch, batch_size: int) -> Optional[int]:
    """Analytic forward + backward GEMM FLOPs of a cross set arch from its layer shapes (None for other arches).

    Per set: each full-rank cross layer is a ``[B, D] x [D, D]`` GEMM, each low-rank one two GEMMs through rank
    ``r``, then the projection ``[B, D] x [D, H]``; backward computes input and weight gradients (2x forward).
    Element-wise work is not counted.
    """
    if not isinstance(arch, CrossSetArch):
        return None
    cross, d_in = arch.crossnet, arch.crossnet.in_features
    if isinstance(cross, BatchedCrossNet):
        per_set = cross.num_layers * _linear_flops(batch_size, d_in, d_in)
    elif isinstance(cross, BatchedLowRankCrossNet):
        per_set = cross.num_layers * 2 * _linear_flops(batch_size, d_in, cross.low_rank)
    else:
        return None
    projection = arch.projection
    return arch.num_sets * (per_set + _linear_flops(batch_size, projection.in_features, projection.out_features))


def counted_flops(module: nn.Module, *shapes: Sequence[int]) -> int:
    """Forward + backward FLOPs that ``torch.utils.flop_counter`` counts (GEMMs) for ``module`` on random inputs of
    ``shapes``, run on a ``meta`` copy: logical layer shapes, no compute, and none of the CPU fast path's padding."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(module).to(torch.device("meta"))
    inputs = [torch.empty(*shape, device="meta", requires_grad=True) for shape in shapes]
    with FlopCounterMode(display=False) as counter:
        meta(*inputs).sum().backward()
    return int(counter.get_total_flops())


def step_flops(model: MultiEmbeddingModel, batch_size: int) -> int:
    """Forward + backward GEMM FLOPs of one training step of ``model``: the set arch (analytic for cross arches,
    counted otherwise) plus the over arch and the dense arch (counted on a ``batch_size`` input)."""
    set_arch = model.set_arch
    total = set_arch_flops(set_arch, batch_size)
    if total is None:
        total = counted_flops(set_arch, (batch_size, set_arch.num_sets, set_arch.num_fields, set_arch.set_dim))
    total += counted_flops(model.over_arch, (batch_size, set_arch.output_dim))
    if model.dense_arch is not None:
        total += counted_flops(model.dense_arch, (batch_size, model.dense_arch.in_features))
    return total
