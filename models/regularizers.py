r"""Regularisers of DCNv2's field-pair maps :math:`W_{i\to j}` (the paper's Evidence III and its ME ablation).

``W_{i->j}``, the map by which field ``j`` sees field ``i``, is block ``[j*d:(j+1)*d, i*d:(i+1)*d]`` of the first
full-rank cross layer's weight (:class:`~multiembed.models.interactions.BatchedCrossNet`; the paper's sub-embedding
analysis reads the same layer), one weight per set (``G`` weight sets).

- :class:`ProjectionRegularizer`: :math:`\sum_{i,j} \lVert W_{i\to j}^\top W_{i\to j} - \lambda_{ij} I
  \rVert_F^2` with a learnable :math:`\lambda_{ij}` per weight set and field pair: it pushes every map towards a
  scaled orthogonal one, which keeps the field's sub-embedding :math:`E_i W_{i\to j}^\top` as spread as ``E_i``.
  The paper's weighted variant applies :math:`N_{ij} W_{i\to j}` in the forward pass, a learnable scalar per map
  (:class:`~multiembed.models.interactions.BatchedCrossNet` with ``pair_scale_dim``), and regularises the unscaled
  :math:`W_{i\to j}` with this same term.
- :class:`SetDivergencePenalty`: :math:`\sum_{i,j} \mathrm{Var}_m \lVert W^{(m)}_{i\to j} \rVert_F` over the
  sets ``m`` of a multi-embedding model: it restricts how differently the sets weigh each field pair.

Both take their sizes at construction and check nothing in ``forward`` (TorchRec's train pipeline fx-traces the
train module, where shapes are proxies); :func:`set_divergence_penalty` and :func:`field_pair_norms` check the
weight they are given.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from multiembed.models.interactions import BatchedCrossNet


def _pair_blocks(weight: torch.Tensor, num_fields: int, set_dim: int) -> torch.Tensor:
    """``[G, F*d, F*d] -> [G, F(i), F(j), d, d]`` without checks (fx-traceable)."""
    # [G, F_out(j), d, F_in(i), d] -> [G, i, j, d, d]
    return weight.unflatten(1, (num_fields, set_dim)).unflatten(3, (num_fields, set_dim)).permute(0, 3, 1, 2, 4)


def _pair_norms(weight: torch.Tensor, num_fields: int, set_dim: int) -> torch.Tensor:
    return _pair_blocks(weight, num_fields, set_dim).square().sum(dim=(-1, -2)).sqrt()


def _fields_of(weight: torch.Tensor, set_dim: int, what: str) -> int:
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2] or set_dim < 1 or weight.shape[1] % set_dim:
        raise ValueError(f"{what}: expected a weight [G, F*d, F*d] with d = {set_dim} dividing F*d, got "
                         f"{tuple(weight.shape)}")
    return weight.shape[1] // set_dim


def field_pair_blocks(weight: torch.Tensor, set_dim: int) -> torch.Tensor:
    r"""The field-pair blocks of a cross weight: ``[G, F*d, F*d] -> [G, F, F, d, d]``, ``[g, i, j]`` being
    :math:`W_{i\to j}` (block ``(j, i)``, ``nn.Linear``'s (out, in) convention).

    Example::

        >>> weight = torch.arange(16.0).view(1, 4, 4)  # F = 2 fields of d = 2
        >>> field_pair_blocks(weight, 2)[0, 0, 1]  # W_{0->1}: rows 2..3, columns 0..1
        tensor([[ 8.,  9.],
                [12., 13.]])
    """
    return _pair_blocks(weight, _fields_of(weight, set_dim, "field_pair_blocks"), set_dim)


def field_pair_norms(weight: torch.Tensor, set_dim: int) -> torch.Tensor:
    r"""``[G, F*d, F*d] -> [G, F, F]``: :math:`\lVert W^{(g)}_{i\to j} \rVert_F`, ``[g, i, j]``.

    Example::

        >>> field_pair_norms(torch.ones(1, 4, 4), 2)  # every 2 x 2 block of ones has norm 2
        tensor([[[2., 2.],
                 [2., 2.]]])
    """
    return _pair_norms(weight, _fields_of(weight, set_dim, "field_pair_norms"), set_dim)


def first_cross_net(set_arch: nn.Module, what: str) -> BatchedCrossNet:
    """The full-rank cross net of a zoo model's set arch (``what`` names the caller in the error).

    Raises:
        ValueError: the set arch has no full-rank cross net (every backbone but ``dcnv2``).
    """
    crossnet = getattr(set_arch, "crossnet", None)
    if not isinstance(crossnet, BatchedCrossNet):
        raise ValueError(f"{what}: needs a full-rank DCNv2 (a dcnv2-* model); this model has no W_(i->j) maps")
    return crossnet


class ProjectionRegularizer(nn.Module):
    r"""The paper's regularised DCNv2: :math:`\sum_{g,i,j} \lVert W_{i\to j}^\top W_{i\to j} - \lambda_{gij} I
    \rVert_F^2` of a cross weight, with learnable :math:`\lambda` (initialised to 1).

    Computed as :math:`\lVert G \rVert_F^2 - 2 \lambda\, \mathrm{tr}\, G + d \lambda^2` with
    :math:`G = W^\top W` (:math:`\mathrm{tr}\, G = \lVert W \rVert_F^2`).

    Args:
        num_weight_sets: G, the cross weights per layer.
        num_fields: F, the fields of the cross input.
        set_dim: d, the width of each field's block.
        device: where ``lambdas`` live.

    Attributes:
        lambdas: ``[G, F, F]``, :math:`\lambda_{gij}`.

    Example::

        >>> cross = BatchedCrossNet(num_sets=1, in_features=20, num_layers=2)  # F = 2 fields of d = 10
        >>> regularizer = ProjectionRegularizer(1, 2, 10)
        >>> regularizer.lambdas.shape, regularizer(cross.weights[0]).dim()
        (torch.Size([1, 2, 2]), 0)
    """

    def __init__(self, num_weight_sets: int, num_fields: int, set_dim: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if min(num_weight_sets, num_fields, set_dim) < 1:
            raise ValueError(
                f"ProjectionRegularizer: num_weight_sets, num_fields and set_dim must be >= 1, got {num_weight_sets}, "
                f"{num_fields}, {set_dim}"
            )
        self.num_fields = num_fields
        self.set_dim = set_dim
        self.lambdas = nn.Parameter(torch.empty(num_weight_sets, num_fields, num_fields, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.lambdas.fill_(1.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """
        Args:
            weight: a cross layer's weight ``[G, F*d, F*d]``.

        Returns:
            the regulariser, a scalar.
        """
        blocks = _pair_blocks(weight, self.num_fields, self.set_dim)  # [G, F, F, d, d]
        gram = blocks.transpose(-1, -2) @ blocks
        trace = blocks.square().sum(dim=(-1, -2))  # [G, F, F]
        lam = self.lambdas
        return (gram.square().sum(dim=(-1, -2)) - 2.0 * lam * trace + self.set_dim * lam.square()).sum()


class SetDivergencePenalty(nn.Module):
    r""":math:`\sum_{i,j} \mathrm{Var}_m \lVert W^{(m)}_{i\to j} \rVert_F`: the variance over the weight sets
    (unbiased, as ``Tensor.var``) of each field-pair map's Frobenius norm, summed over the field pairs. No parameters.

    Args:
        num_weight_sets: G (at least 2).
        num_fields: F.
        set_dim: d.

    Example::

        >>> cross = BatchedCrossNet(num_sets=2, in_features=20, num_layers=1)
        >>> float(SetDivergencePenalty(2, 2, 10)(cross.weights[0])) >= 0.0
        True
    """

    def __init__(self, num_weight_sets: int, num_fields: int, set_dim: int) -> None:
        super().__init__()
        if num_weight_sets < 2:
            raise ValueError(
                f"SetDivergencePenalty: needs at least 2 weight sets (a *-me-* model), got {num_weight_sets}"
            )
        if min(num_fields, set_dim) < 1:
            raise ValueError(f"SetDivergencePenalty: num_fields and set_dim must be >= 1, got {num_fields}, {set_dim}")
        self.num_fields = num_fields
        self.set_dim = set_dim

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """
        Args:
            weight: a cross layer's weight ``[G, F*d, F*d]``.

        Returns:
            the penalty, a scalar.
        """
        return _pair_norms(weight, self.num_fields, self.set_dim).var(dim=0).sum()


def set_divergence_penalty(weight: torch.Tensor, set_dim: int) -> torch.Tensor:
    """:class:`SetDivergencePenalty` of ``weight`` ``[G, F*d, F*d]``, its sizes checked.

    Raises:
        ValueError: not ``[G, F*d, F*d]``, or fewer than 2 weight sets.
    """
    num_fields = _fields_of(weight, set_dim, "set_divergence_penalty")
    if weight.shape[0] < 2:
        raise ValueError(
            f"set_divergence_penalty: needs at least 2 weight sets (a *-me-* model), got a weight {tuple(weight.shape)}"
        )
    return SetDivergencePenalty(weight.shape[0], num_fields, set_dim)(weight)


__all__ = [
    "ProjectionRegularizer", "SetDivergencePenalty", "field_pair_blocks", "field_pair_norms", "first_cross_net",
    "set_divergence_penalty",
]
