"""FFM (field-aware FM): each field shows every other field its own sub-embedding; the pairwise field-aware inner
products, projected to H; MLP head.

The set width ``d`` holds ``F - 1`` sub-embeddings of width ``d // (F - 1)`` (:class:`FieldAwareInnerProducts
<multiembed.models.interactions.FieldAwareInnerProducts>`), so name a width that ``F - 1`` divides, e.g.
``ffm-se-1x28`` for 8 fields (sub-embeddings of width 4). The base width, 38, gives each of Criteo's 39 fields one
column per other field. The paper analyses FFM's sub-embeddings (its Evidence I).
"""

from __future__ import annotations

from typing import Any, Mapping

from multiembed.models.backbones.base import Backbone, SetArchContext
from multiembed.models.set_arch import FieldAwareSetArch, SetInteractionArch


def build_set_arch(ctx: SetArchContext, options: Mapping[str, Any]) -> SetInteractionArch:
    """``field-aware products -> proj``: ``[B, K, F, d] -> [B, K, H]``."""
    f = ctx.num_fields
    return FieldAwareSetArch(f, ctx.set_dim, ctx.projection(f * (f - 1) // 2))


BACKBONE = Backbone(name="ffm", base_set_dim=38, position=8, set_arch=build_set_arch)
