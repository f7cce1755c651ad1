"""NFwFM: ``sum_ij r_ij e_i * e_j`` -> BatchNorm -> Dropout -> projection to H (set width 50); MLP head."""

from __future__ import annotations

from typing import Any, Mapping

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.interactions import FieldWeightedFM
from multiembed.models.layers import SetBatchNorm
from multiembed.models.set_arch import FwFMSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``[B, K, F, d] -> [B, K, H]`` through the field-weighted products."""
    k, d, f = ctx.num_sets, ctx.set_dim, ctx.num_fields
    return FwFMSetArch(
        f, d, FieldWeightedFM(k, f, ctx.groups, device=ctx.device),
        SetBatchNorm(k, d, ctx.groups, device=ctx.device), ctx.dropout, ctx.projection(d),
    )


BACKBONE = Backbone(name="nfwfm", base_set_dim=50, position=2, set_arch=build_set_arch)
