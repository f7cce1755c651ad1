"""IPNN: the pairwise inner products of the fields (SE also feeds the embeddings), projected to H; MLP head.

Option ``include_embeddings`` (default: True for SE, False for ME / MESI, as the paper's code).
"""

from __future__ import annotations

from typing import Any, Mapping

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.set_arch import InnerProductSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``[concat,] products -> proj``: ``[B, K, F, d] -> [B, K, H]``."""
    include = options["include_embeddings"]
    include = ctx.mode == "se" if include is None else bool(include)
    f, d = ctx.num_fields, ctx.set_dim
    width = f * (f - 1) // 2 + (f * d if include else 0)
    return InnerProductSetArch(f, d, ctx.projection(width), prepend="embeddings" if include else "none")


BACKBONE = Backbone(
    name="ipnn", base_set_dim=10, position=1, set_arch=build_set_arch, options={"include_embeddings": None},
)
