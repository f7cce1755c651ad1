"""DCNv2: full-rank cross layers on the concatenated fields, projected to H; MLP head.

Options ``cross_layers`` (default 4) and ``pair_scales`` (default False; True: the first cross layer's field-pair
maps ``W_{i->j}`` are each multiplied by a learnable scalar ``N_ij``, initialised to 1, the paper's weighted
regularised DCNv2: :class:`~multiembed.models.interactions.BatchedCrossNet`).
"""

from __future__ import annotations

from typing import Any, Mapping

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.interactions import BatchedCrossNet
from multiembed.models.set_arch import CrossSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``concat -> cross -> proj``: ``[B, K, F, d] -> [B, K, H]``."""
    width = ctx.num_fields * ctx.set_dim
    cross = BatchedCrossNet(
        ctx.num_sets, width, int(options["cross_layers"]), ctx.groups,
        pair_scale_dim=ctx.set_dim if options["pair_scales"] else None, device=ctx.device,
    )
    return CrossSetArch(ctx.num_fields, ctx.set_dim, cross, ctx.projection(width))


BACKBONE = Backbone(
    name="dcnv2", base_set_dim=10, position=4, set_arch=build_set_arch,
    options={"cross_layers": 4, "pair_scales": False},
)
