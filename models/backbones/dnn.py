"""DNN: the set's fields concatenated, ``[B, K, F * d]``, projected to H; MLP head."""

from __future__ import annotations

from typing import Any, Mapping

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.set_arch import FlatSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``concat -> proj``: ``[B, K, F, d] -> [B, K, H]``."""
    return FlatSetArch(ctx.num_fields, ctx.set_dim, ctx.projection(ctx.num_fields * ctx.set_dim))


BACKBONE = Backbone(name="dnn", base_set_dim=10, position=0, set_arch=build_set_arch)
