"""What a backbone registers: its set arch, its over arch, its options and its base width.

Each module of :mod:`multiembed.models.backbones` defines one :class:`Backbone` named ``BACKBONE``; the zoo
(:mod:`multiembed.models.zoo`) builds any of them through the same two calls, so adding a backbone is adding one
module there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple

import torch
from torch import nn

from multiembed.models.layers import SetProjection
from multiembed.models.over_arch import MLPOverArch
from multiembed.models.set_arch import SetInteractionArch

# Options every backbone takes (build_model's own: the sparse arch's stored width, the dense arch, the MLP head).
COMMON_OPTIONS: FrozenSet[str] = frozenset({"over_layer_sizes", "dense_arch_layer_sizes", "stored_set_dim"})


@dataclasses.dataclass(frozen=True)
class SetArchContext:
    """The sizes a set arch is built for.

    Attributes:
        num_sets: K, the sets this arch runs over.
        set_dim: d, the width of each set.
        num_fields: F (+1 with a dense arch).
        groups: distinct weight groups over the K sets (1 for the ``mesi`` ablation, K otherwise).
        mode: ``se``, ``me`` or ``mesi`` (some backbones build the SE form differently).
        hidden: projection width H.
        dropout: dropout probability.
        dense_field: the last field is the dense arch's output.
        device: where the parameters live.
    """

    num_sets: int
    set_dim: int
    num_fields: int
    groups: int
    mode: str
    hidden: int
    dropout: float
    dense_field: bool = False
    device: Optional[torch.device] = None

    def projection(self, in_features: int) -> SetProjection:
        """The per-set ``Linear -> BatchNorm -> ReLU -> Dropout`` from ``in_features`` to H."""
        return SetProjection(self.num_sets, in_features, self.hidden, self.dropout, self.groups, device=self.device)


SetArchBuilder = Callable[[SetArchContext, Mapping[str, Any]], SetInteractionArch]
OverArchBuilder = Callable[[SetInteractionArch, Tuple[int, ...], float, Optional[torch.device]], nn.Module]


def mlp_over_arch(
    set_arch: SetInteractionArch, layers: Tuple[int, ...], dropout: float, device: Optional[torch.device]
) -> nn.Module:
    """The plain head: an MLP over the set arch's ``[B, output_dim]`` average, ``-> [B, 1]``."""
    return MLPOverArch(set_arch.output_dim, layers, dropout, device=device)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One backbone of the zoo.

    Attributes:
        name: the name's first part (``dcnv2`` in ``dcnv2-me-4x``).
        base_set_dim: the set width of its SE-1x model (the paper's).
        position: where it is listed in :data:`~multiembed.models.names.BACKBONES` (the paper's table order).
        set_arch: builds the set arch ``[B, K, F, d] -> [B, K, output_dim]`` from the sizes and the options.
        options: the options it takes and their defaults (None: the default depends on the mode).
        over_arch: builds the shared head over the set arch (default an MLP).
        mlp_head: takes ``over_layer_sizes`` (False where the head is not an MLP).
    """

    name: str
    base_set_dim: int
    position: int
    set_arch: SetArchBuilder
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    over_arch: OverArchBuilder = mlp_over_arch
    mlp_head: bool = True

    def option_names(self) -> FrozenSet[str]:
        """Every option this backbone's models take, its own and the common ones."""
        common = COMMON_OPTIONS if self.mlp_head else COMMON_OPTIONS - {"over_layer_sizes"}
        return frozenset(self.options) | common

    def resolve_options(self, model: str, overrides: Mapping[str, Any]) -> Dict[str, Any]:
        """The defaults updated with ``overrides``.

        Args:
            model: the model's name, for the error message.
            overrides: options given by the caller.

        Raises:
            ValueError: an option this backbone does not take; the message lists those it takes.
        """
        unknown = sorted(set(overrides) - self.option_names())
        if unknown:
            raise ValueError(
                f"{model}: unknown option(s) {', '.join(unknown)}; {self.name} takes "
                f"{', '.join(sorted(self.option_names()))}"
            )
        return {**self.options, **overrides}


# Every backbone by name, in listing order: filled with each module's BACKBONE when the package is imported.
REGISTRY: Dict[str, Backbone] = {}
