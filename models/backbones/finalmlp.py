"""FinalMLP: two MLP streams over the concatenated fields, fused by a bilinear head (no MLP over arch).

Option ``stream_layer_sizes`` (default ``(hidden, hidden)``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.interactions import TwoStreamMLP
from multiembed.models.over_arch import BilinearFusionOverArch
from multiembed.models.set_arch import SetInteractionArch, TwoStreamSetArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``[B, K, F, d] -> [B, K, 2 * stream_dim]``: both streams' outputs."""
    sizes = options["stream_layer_sizes"] or (ctx.hidden, ctx.hidden)
    streams = TwoStreamMLP(ctx.num_sets, ctx.num_fields * ctx.set_dim, tuple(sizes), ctx.dropout, ctx.groups,
                           device=ctx.device)
    return TwoStreamSetArch(ctx.num_fields, ctx.set_dim, streams)


def build_over_arch(
    set_arch: SetInteractionArch, layers: Tuple[int, ...], dropout: float, device: Optional[torch.device]
) -> nn.Module:
    """The bilinear fusion of the two averaged streams, ``-> [B, 1]`` (``layers`` and ``dropout`` unused)."""
    assert isinstance(set_arch, TwoStreamSetArch)
    return BilinearFusionOverArch(set_arch.streams.stream_dim, device=device)


BACKBONE = Backbone(
    name="finalmlp", base_set_dim=10, position=6, set_arch=build_set_arch, over_arch=build_over_arch,
    options={"stream_layer_sizes": None}, mlp_head=False,
)
