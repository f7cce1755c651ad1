"""Heterogeneous ME (``hetero-me-{s}x``): each kind of expert's sets batched as that backbone's ME arch.

Option ``experts`` (default ``("dcnv2", "ipnn", "nfwfm", "dnn")``, cycled over the sets;
:mod:`multiembed.models.hetero`). Each expert is built with its own backbone's default options; MLP head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from multiembed.models.backbones.base import REGISTRY, Backbone, SetArchContext
from multiembed.models.hetero import DEFAULT_EXPERTS, HeteroSetArch, expert_groups, parse_experts
from multiembed.models.set_arch import SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``[B, K, F, d] -> [B, K, H]``: the experts' ME arches over consecutive slices of the sets."""
    kinds, arches = [], []
    for kind, count in expert_groups(parse_experts(options["experts"]), ctx.num_sets):
        expert = REGISTRY[kind]
        sizes = dataclasses.replace(ctx, num_sets=count, groups=count, mode="me")
        kinds.append(kind)
        arches.append(expert.set_arch(sizes, dict(expert.options)))
    return HeteroSetArch(kinds, arches)


BACKBONE = Backbone(
    name="hetero", base_set_dim=10, position=8, set_arch=build_set_arch, options={"experts": DEFAULT_EXPERTS},
)
