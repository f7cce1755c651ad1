"""Set interaction arches: the K set-specific branches ``h_m = P_m(I_m(e^(m)))`` of each backbone, batched.

Every arch maps the sparse arch's ``[B, K, F, d]`` to ``[B, K, output_dim]``: one row of features per set, to be
averaged over sets by the model. Each is composed from built modules (an interaction core of
:mod:`multiembed.models.interactions` and a :class:`~multiembed.models.layers.SetProjection`), in the paper's ME
form; SE is K = 1. Where the paper's code builds SE differently (IPNN: SE feeds the embeddings *and* the products
to its MLP, the ME branch only the products) an argument selects the form.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from multiembed.models.interactions import (
    BatchedCrossNet,
    BatchedLowRankCrossNet,
    CompressedInteraction,
    FieldAwareInnerProducts,
    FieldWeightedFM,
    PairwiseInnerProducts,
    TwoStreamMLP,
)
from multiembed.models.layers import SetBatchNorm, SetProjection, as_set_major, flatten_fields


class SetInteractionArch(nn.Module):
    """Base of the set arches: ``[B, K, F, d] -> [B, K, output_dim]``.

    Subclasses hold built modules and implement ``forward``; the model averages the output over sets.

    Attributes:
        num_sets: K.
        num_fields: F (the dense arch's output counts as one field when present).
        set_dim: d.
        output_dim: features per set.

    Example::

        >>> arch = FlatSetArch(39, 10, SetProjection(4, 390, 400, dropout=0.2))
        >>> isinstance(arch, SetInteractionArch), arch.num_sets, arch.output_dim
        (True, 4, 400)
    """

    def __init__(self, num_sets: int, num_fields: int, set_dim: int, output_dim: int) -> None:
        super().__init__()
        if min(num_sets, num_fields, set_dim, output_dim) < 1:
            raise ValueError(
                f"num_sets, num_fields, set_dim and output_dim must be >= 1, got {num_sets}, {num_fields}, "
                f"{set_dim}, {output_dim}"
            )
        self.num_sets = num_sets
        self.num_fields = num_fields
        self.set_dim = set_dim
        self.output_dim = output_dim

    @staticmethod
    def _check(what: str, got: int, expected: int) -> None:
        if got != expected:
            raise ValueError(f"{what} is {got}, expected {expected}")


def _check_projection(arch: SetInteractionArch, projection: SetProjection, in_features: int) -> None:
    arch._check("projection num_sets", projection.num_sets, arch.num_sets)
    arch._check("projection in_features", projection.in_features, in_features)


class FlatSetArch(SetInteractionArch):
    """DNN: no interaction; each set's concatenated embeddings go through its projection.

    Args:
        num_fields: F.
        set_dim: d.
        projection: ``SetProjection(K, F*d, H)``.

    Example::

        >>> arch = FlatSetArch(39, 10, SetProjection(4, 390, 400, dropout=0.2))
        >>> arch(torch.randn(32, 4, 39, 10)).shape
        torch.Size([32, 4, 400])
    """

    def __init__(self, num_fields: int, set_dim: int, projection: SetProjection) -> None:
        super().__init__(projection.num_sets, num_fields, set_dim, projection.out_features)
        _check_projection(self, projection, num_fields * set_dim)
        self.projection = projection

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, H]``.
        """
        return self.projection(flatten_fields(embeddings))


class CrossSetArch(SetInteractionArch):
    """DCNv2 (full-rank, the paper's) or DLRM-DCNv2 (low-rank): cross network stacked before the projection.

    Args:
        num_fields: F.
        set_dim: d.
        crossnet: :class:`BatchedCrossNet` or :class:`BatchedLowRankCrossNet` over ``D = F*d``.
        projection: ``SetProjection(K, F*d, H)``.

    Example::

        >>> arch = CrossSetArch(39, 10, BatchedCrossNet(4, 390, num_layers=4), SetProjection(4, 390, 400, 0.2))
        >>> arch(torch.randn(32, 4, 39, 10)).shape
        torch.Size([32, 4, 400])
    """

    def __init__(
        self,
        num_fields: int,
        set_dim: int,
        crossnet: Union[BatchedCrossNet, BatchedLowRankCrossNet],
        projection: SetProjection,
    ) -> None:
        super().__init__(projection.num_sets, num_fields, set_dim, projection.out_features)
        _check_projection(self, projection, num_fields * set_dim)
        self._check("crossnet num_sets", crossnet.num_sets, self.num_sets)
        self._check("crossnet in_features", crossnet.in_features, num_fields * set_dim)
        self.crossnet = crossnet
        self.projection = projection

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, H]``.
        """
        return self.projection(self.crossnet(flatten_fields(embeddings)))

    def cross_weights(self, layer: int = 0) -> torch.Tensor:
        """Full-rank cross weight of ``layer`` for every set, ``[K, F*d, F*d]`` (out, in), detached: the weight the
        layer applies (with ``pair_scales``, each first-layer block times its scalar).

        Block ``[j*d:(j+1)*d, i*d:(i+1)*d]`` is ``W_{i->j}``; sets sharing an interaction (``mesi``) return the same
        matrix.

        Raises:
            ValueError: the cross net is low-rank, or ``layer`` is out of range.
        """
        if not isinstance(self.crossnet, BatchedCrossNet):
            raise ValueError("cross_weights needs the full-rank cross net (dcnv2); dcnv2lr is low-rank")
        if not 0 <= layer < self.crossnet.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.crossnet.num_layers - 1}")
        weight = self.crossnet.layer_weight(layer).detach()
        return weight.repeat_interleave(self.num_sets // self.crossnet.num_weight_sets, dim=0)


PREPEND_CHOICES = ("none", "embeddings", "dense_field")


class InnerProductSetArch(SetInteractionArch):
    """IPNN and DLRM: pairwise inner products of the fields, optionally with features concatenated in front, then
    the projection. The two backbones differ only in what goes in front of the products (``prepend``):

    - ``"none"``: the products alone (the paper's ME IPNN branch; DLRM without a dense arch).
    - ``"embeddings"``: each set's concatenated embeddings ``[F*d]`` (the paper's SE IPNN feeds
      ``[embeddings, products]`` to its MLP, so ME with K = 1 is not SE for IPNN: both forms are kept faithful).
    - ``"dense_field"``: the last field, the dense arch's output ``[d]`` (DLRM, as TorchRec's ``InteractionArch``).

    Args:
        num_fields: F (the dense field included when present).
        set_dim: d.
        projection: ``SetProjection(K, F*(F-1)/2 + P, H)`` with ``P`` = 0, ``F*d`` or ``d`` by ``prepend``.
        prepend: one of :data:`PREPEND_CHOICES`.

    Example::

        >>> ipnn = InnerProductSetArch(39, 10, SetProjection(4, 741, 400, 0.2))  # ME IPNN
        >>> ipnn(torch.randn(32, 4, 39, 10)).shape
        torch.Size([32, 4, 400])
        >>> dlrm = InnerProductSetArch(27, 16, SetProjection(2, 351 + 16, 400, 0.2), prepend="dense_field")
        >>> dlrm(torch.randn(32, 2, 27, 16)).shape
        torch.Size([32, 2, 400])
    """

    def __init__(self, num_fields: int, set_dim: int, projection: SetProjection, prepend: str = "none") -> None:
        super().__init__(projection.num_sets, num_fields, set_dim, projection.out_features)
        if prepend not in PREPEND_CHOICES:
            raise ValueError(f"prepend must be one of {', '.join(PREPEND_CHOICES)}, got {prepend!r}")
        self.products = PairwiseInnerProducts(num_fields)
        self.prepend = prepend
        extra = {"none": 0, "embeddings": num_fields * set_dim, "dense_field": set_dim}[prepend]
        _check_projection(self, projection, self.products.output_dim + extra)
        self.projection = projection

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, H]``.
        """
        per_set = as_set_major(embeddings)  # [K, B, F, d]
        products = self.products(per_set)  # [K, B, F*(F-1)/2]
        if self.prepend == "embeddings":
            products = torch.cat([per_set.flatten(2), products], dim=2)
        elif self.prepend == "dense_field":
            products = torch.cat([per_set[:, :, -1, :], products], dim=2)
        return self.projection(products)


class FieldAwareSetArch(SetInteractionArch):
    """FFM: the field-aware inner products of every field pair (:class:`FieldAwareInnerProducts`), then the
    projection.

    Args:
        num_fields: F (the dense field included when present).
        set_dim: d, holding ``F - 1`` sub-embeddings of width ``d // (F - 1)``.
        projection: ``SetProjection(K, F*(F-1)/2, H)``.

    Example::

        >>> ffm = FieldAwareSetArch(8, 14, SetProjection(2, 28, 64, 0.0))  # sub-embeddings of width 2
        >>> ffm(torch.randn(32, 2, 8, 14)).shape
        torch.Size([32, 2, 64])
    """

    def __init__(self, num_fields: int, set_dim: int, projection: SetProjection) -> None:
        super().__init__(projection.num_sets, num_fields, set_dim, projection.out_features)
        self.products = FieldAwareInnerProducts(num_fields, set_dim)
        _check_projection(self, projection, self.products.output_dim)
        self.projection = projection

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, H]``.
        """
        return self.projection(self.products(as_set_major(embeddings)))


class FwFMSetArch(SetInteractionArch):
    """NFwFM: field-weighted bi-interaction -> BatchNorm -> Dropout, then the projection (the paper's code).

    Args:
        num_fields: F.
        set_dim: d (50 in the paper).
        fwfm: :class:`FieldWeightedFM`.
        norm: ``SetBatchNorm(K, d)``.
        dropout: dropout after the BatchNorm.
        projection: ``SetProjection(K, d, H)``.

    Example::

        >>> arch = FwFMSetArch(39, 50, FieldWeightedFM(2, 39), SetBatchNorm(2, 50), 0.2, SetProjection(2, 50, 400, 0.2))
        >>> arch(torch.randn(32, 2, 39, 50)).shape
        torch.Size([32, 2, 400])
    """

    def __init__(
        self,
        num_fields: int,
        set_dim: int,
        fwfm: FieldWeightedFM,
        norm: SetBatchNorm,
        dropout: float,
        projection: SetProjection,
    ) -> None:
        super().__init__(projection.num_sets, num_fields, set_dim, projection.out_features)
        _check_projection(self, projection, set_dim)
        self._check("fwfm num_sets", fwfm.num_sets, self.num_sets)
        self._check("fwfm num_fields", fwfm.num_fields, num_fields)
        self._check("norm num_sets", norm.num_sets, self.num_sets)
        self._check("norm num_features", norm.num_features, set_dim)
        self.fwfm = fwfm
        self.norm = norm
        self.dropout = nn.Dropout(dropout)
        self.projection = projection

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, H]``.
        """
        interaction = self.fwfm(as_set_major(embeddings))  # [K, B, d]
        normed = self.dropout(self.norm(interaction.transpose(0, 1)))  # [B, K, d]
        return self.projection(normed.transpose(0, 1))


class CINSetArch(SetInteractionArch):
    """xDeepFM: per set, the CIN's pooled feature maps and the projection of the concatenated embeddings.

    Output ``[B, K, C + H]``: the ``C = sum(cin layer sizes)`` CIN features then the ``H`` projection features, so
    the mean over sets averages both, as the paper's code (``MultiXDeepFM``); :class:`~multiembed.models.over_arch.
    CINOverArch` reads the two parts.

    Args:
        num_fields: F.
        set_dim: d.
        cin: :class:`CompressedInteraction`.
        projection: ``SetProjection(K, F*d, H)`` (the first layer of xDeepFM's DNN part).

    Example::

        >>> arch = CINSetArch(39, 10, CompressedInteraction(2, 39, (16, 16)), SetProjection(2, 390, 400, 0.2))
        >>> arch(torch.randn(32, 2, 39, 10)).shape
        torch.Size([32, 2, 432])
    """

    def __init__(self, num_fields: int, set_dim: int, cin: CompressedInteraction, projection: SetProjection) -> None:
        super().__init__(projection.num_sets, num_fields, set_dim, cin.output_dim + projection.out_features)
        _check_projection(self, projection, num_fields * set_dim)
        self._check("cin num_sets", cin.num_sets, self.num_sets)
        self._check("cin num_fields", cin.num_fields, num_fields)
        self.cin = cin
        self.projection = projection
        self.cin_dim = cin.output_dim

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, C + H]``.
        """
        per_set = as_set_major(embeddings)
        cin_features = self.cin(per_set).transpose(0, 1)  # [B, K, C]
        return torch.cat([cin_features, self.projection(per_set.flatten(2))], dim=2)


class TwoStreamSetArch(SetInteractionArch):
    """FinalMLP: two full MLP streams per set; the model averages the streams' outputs over sets and the bilinear
    fusion (:class:`~multiembed.models.over_arch.BilinearFusionOverArch`) gives the logit (the paper's code).

    Args:
        num_fields: F.
        set_dim: d.
        streams: :class:`TwoStreamMLP` over ``F*d``.

    Example::

        >>> arch = TwoStreamSetArch(39, 10, TwoStreamMLP(2, 390, (400, 400), dropout=0.2))
        >>> arch(torch.randn(32, 2, 39, 10)).shape
        torch.Size([32, 2, 800])
    """

    def __init__(self, num_fields: int, set_dim: int, streams: TwoStreamMLP) -> None:
        super().__init__(streams.num_sets, num_fields, set_dim, streams.output_dim)
        self._check("streams in_features", streams.in_features, num_fields * set_dim)
        self.streams = streams

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, 2 * stream width]``.
        """
        return self.streams(flatten_fields(embeddings))
