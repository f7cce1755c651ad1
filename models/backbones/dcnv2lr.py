"""DCNv2 low-rank (TorchRec's ``LowRankCrossNet``): low-rank cross layers, projected to H; MLP head.

Options ``cross_layers`` (default 3) and ``cross_rank`` (default 512).
"""

from __future__ import annotations

from typing import Any, Mapping

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.interactions import BatchedLowRankCrossNet
from multiembed.models.set_arch import CrossSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``concat -> low-rank cross -> proj``: ``[B, K, F, d] -> [B, K, H]``."""
    width = ctx.num_fields * ctx.set_dim
    low_rank = BatchedLowRankCrossNet(
        ctx.num_sets, width, int(options["cross_layers"]), int(options["cross_rank"]), ctx.groups, device=ctx.device,
    )
    return CrossSetArch(ctx.num_fields, ctx.set_dim, low_rank, ctx.projection(width))


BACKBONE = Backbone(
    name="dcnv2lr", base_set_dim=10, position=5, set_arch=build_set_arch,
    options={"cross_layers": 3, "cross_rank": 512},
)
