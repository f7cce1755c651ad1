"""DLRM (TorchRec's dot interaction, set width 16): [the dense field,] pairwise dot products -> projection to H."""

from __future__ import annotations

from typing import Any, Mapping

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.set_arch import InnerProductSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``[dense field,] dots -> proj``: ``[B, K, F, d] -> [B, K, H]``."""
    f, d = ctx.num_fields, ctx.set_dim
    width = f * (f - 1) // 2 + (d if ctx.dense_field else 0)
    prepend = "dense_field" if ctx.dense_field else "none"
    return InnerProductSetArch(f, d, ctx.projection(width), prepend=prepend)


BACKBONE = Backbone(name="dlrm", base_set_dim=16, position=7, set_arch=build_set_arch)
