"""xDeepFM: CIN features beside the concatenated fields; the head reads the CIN part linearly plus an MLP.

Option ``cin_layer_sizes`` (default ``(16, 16)``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.interactions import CompressedInteraction
from multiembed.models.over_arch import CINOverArch, MLPOverArch
from multiembed.models.set_arch import CINSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``[B, K, F, d] -> [B, K, cin + H]``: the CIN's features and the projected concatenation."""
    k, d, f = ctx.num_sets, ctx.set_dim, ctx.num_fields
    cin = CompressedInteraction(k, f, tuple(options["cin_layer_sizes"]), ctx.groups, device=ctx.device)
    return CINSetArch(f, d, cin, ctx.projection(f * d))


def build_over_arch(
    set_arch: SetInteractionArch, layers: Tuple[int, ...], dropout: float, device: Optional[torch.device]
) -> nn.Module:
    """``Linear(cin -> 1) + MLP(H -> ...) -> 1`` over the averaged ``[B, cin + H]``."""
    assert isinstance(set_arch, CINSetArch)
    mlp = MLPOverArch(set_arch.output_dim - set_arch.cin_dim, layers, dropout, device=device)
    return CINOverArch(set_arch.cin_dim, mlp, device=device)


BACKBONE = Backbone(
    name="xdeepfm", base_set_dim=10, position=3, set_arch=build_set_arch, over_arch=build_over_arch,
    options={"cin_layer_sizes": (16, 16)},
)
