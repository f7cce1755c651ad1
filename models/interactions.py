"""Feature-interaction cores of the paper's backbones, batched over K embedding sets.

Each core takes set-major input (``[K, B, ...]``, see :mod:`multiembed.models.layers`) and holds its weights with a
leading set dimension ``G`` (``G = K`` for multi-embedding, ``G = 1`` for one interaction shared by every set), so
one forward is a fixed number of batched kernels whatever K is. Sets sharing a weight are folded into the batch
(``[K, B, ...]`` viewed as ``[G, (K // G) * B, ...]``).

Initialisations follow the paper's code (``thuml/Multi-Embedding``, ``torchfm``): xavier-uniform full-rank cross
weights with zero bias; standard-normal field-pair weights for NFwFM; ``Conv1d``'s default for the CIN; TorchRec's
``LowRankCrossNet`` (xavier-normal kernels, zero bias) for the low-rank cross.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from multiembed.models import cpu_fastpath
from multiembed.models.layers import SetProjection, check_groups


@torch.fx.wrap
def cross_network(x0: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]) -> torch.Tensor:
    r"""Full-rank cross layers :math:`x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l` on ``[G, N, D]`` input with
    ``[G, D, D]`` weights and ``[G, D]`` biases per layer.

    The reference path is one batched GEMM per layer (autograd); where :func:`~multiembed.models.cpu_fastpath.enabled`
    it is :func:`multiembed.models.cpu_fastpath.cross_network` (one GEMM per weight set at a padded width and a
    written-out backward; the result a ``[G, N, D]`` view of ``[G, N, D']`` storage). Wrapped for fx: the switch is
    plain Python, read at run time.

    Example::

        >>> x = torch.randn(2, 8, 6)
        >>> weights, biases = [torch.randn(2, 6, 6)], [torch.zeros(2, 6)]
        >>> torch.allclose(cross_network(x, weights, biases), x * torch.bmm(x, weights[0].transpose(1, 2)) + x,
        ...                atol=1e-5)
        True
    """
    if cpu_fastpath.enabled(x0):
        return cpu_fastpath.cross_network(x0, weights, biases)
    xl = x0
    for weight, bias in zip(weights, biases):
        projected = torch.baddbmm(bias.unsqueeze(1), xl, weight.transpose(1, 2))
        xl = torch.addcmul(xl, x0, projected)
    return xl


class BatchedCrossNet(nn.Module):
    r"""K full-rank DCNv2 cross networks: :math:`x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l`.

    The paper's (and DCNv2's) full-rank form, stacked before the MLP. Per layer it is one ``baddbmm`` (the
    ``W_l x_l + b_l`` GEMM; one GEMM per weight set on the CPU fast path, :func:`cross_network`) and one
    ``addcmul``.

    ``weights[l][g]`` is ``[D, D]`` in ``nn.Linear``'s (out, in) convention, acting on the concatenation of the
    set's field embeddings, so the block ``weights[l][g][j*d:(j+1)*d, i*d:(i+1)*d]`` is ``W_{i->j}``, the map by
    which field ``j`` sees field ``i`` (the paper's sub-embedding analysis uses layer 0). One parameter per layer
    (not one ``[L, ...]`` tensor): indexing a stacked parameter would make every layer's backward write a
    full-size zero gradient.

    With ``pair_scale_dim = d`` the first layer applies :math:`N_{ij} W_{i\to j}`: every field-pair block times a
    learnable scalar ``pair_scales[g, i, j]`` (initialised to 1), the paper's weighted regularised DCNv2 (its
    regulariser, :class:`~multiembed.models.regularizers.ProjectionRegularizer`, acts on the unscaled ``W``, so the
    scalars keep each map's scale free while ``W`` is pushed towards orthogonal).

    Args:
        num_sets: K.
        in_features: D = F * d.
        num_layers: cross layers (4 in the paper).
        num_weight_sets: G (default K).
        pair_scale_dim: d, the width of each field's block, to give the first layer one learnable scalar per field
            pair and weight set (None, the default: no scalars).
        device: where the parameters live.

    Attributes:
        pair_scales: ``[G, F, F]``, ``[g, i, j]`` scaling :math:`W_{i\to j}` of the first layer, or None.

    Example::

        >>> cross = BatchedCrossNet(num_sets=4, in_features=390, num_layers=4)
        >>> cross(torch.randn(4, 32, 390)).shape
        torch.Size([4, 32, 390])
        >>> BatchedCrossNet(num_sets=1, in_features=390, num_layers=4, pair_scale_dim=10).pair_scales.shape
        torch.Size([1, 39, 39])
    """

    def __init__(
        self,
        num_sets: int,
        in_features: int,
        num_layers: int,
        num_weight_sets: Optional[int] = None,
        pair_scale_dim: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_sets = num_sets
        self.num_weight_sets = check_groups(num_sets, num_weight_sets)
        if in_features < 1 or num_layers < 1:
            raise ValueError(f"in_features and num_layers must be >= 1, got {in_features}, {num_layers}")
        if pair_scale_dim is not None and not (pair_scale_dim >= 1 and in_features % pair_scale_dim == 0):
            raise ValueError(f"pair_scale_dim must be >= 1 and divide in_features {in_features}, got {pair_scale_dim}")
        self.in_features = in_features
        self.num_layers = num_layers
        self.pair_scale_dim = pair_scale_dim
        g = self.num_weight_sets
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(g, in_features, in_features, device=device)) for _ in range(num_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(g, in_features, device=device)) for _ in range(num_layers))
        self.pair_scales: Optional[nn.Parameter] = None
        if pair_scale_dim is not None:
            fields = in_features // pair_scale_dim
            self.pair_scales = nn.Parameter(torch.empty(g, fields, fields, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # xavier_uniform_ of one [D, D] matrix: fan_in = fan_out = D.
        bound = math.sqrt(6.0 / (2 * self.in_features))
        with torch.no_grad():
            for weight, bias in zip(self.weights, self.biases):
                weight.uniform_(-bound, bound)
                bias.zero_()
            if self.pair_scales is not None:
                self.pair_scales.fill_(1.0)

    def layer_weight(self, layer: int) -> torch.Tensor:
        """The weight layer ``layer`` applies, ``[G, D, D]``: ``weights[layer]``, its field-pair blocks times
        ``pair_scales`` in the first layer when the net has them (differentiable in both)."""
        weight = self.weights[layer]
        if layer != 0 or self.pair_scales is None or self.pair_scale_dim is None:
            return weight
        d, fields = self.pair_scale_dim, self.in_features // self.pair_scale_dim
        # [G, F_out(j), d, F_in(i), d] times pair_scales[g, i, j] at [g, j, :, i, :].
        blocks = weight.unflatten(1, (fields, d)).unflatten(3, (fields, d))
        scales = self.pair_scales.transpose(1, 2).unsqueeze(2).unsqueeze(4)
        return (blocks * scales).flatten(3, 4).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, D]`` set-major.

        Returns:
            ``[K, B, D]``.
        """
        x0 = x.reshape(self.num_weight_sets, -1, self.in_features)
        weights = [self.layer_weight(layer) for layer in range(self.num_layers)]
        return cross_network(x0, weights, list(self.biases)).reshape(self.num_sets, -1, self.in_features)

    def extra_repr(self) -> str:
        scaled = "" if self.pair_scale_dim is None else f", pair_scale_dim={self.pair_scale_dim}"
        return (
            f"num_sets={self.num_sets}, in_features={self.in_features}, num_layers={self.num_layers}, "
            f"num_weight_sets={self.num_weight_sets}{scaled}"
        )


class BatchedLowRankCrossNet(nn.Module):
    r"""K low-rank cross networks (TorchRec's ``LowRankCrossNet``):
    :math:`x_{l+1} = x_0 \odot (W_l (V_l x_l) + b_l) + x_l`, ``W_l: [D, r]``, ``V_l: [r, D]``.

    The DLRM-DCNv2 form of MLPerf Training (3 layers, rank 512).

    Args:
        num_sets: K.
        in_features: D = F * d.
        num_layers: cross layers.
        low_rank: r.
        num_weight_sets: G (default K).
        device: where the parameters live.

    Example::

        >>> cross = BatchedLowRankCrossNet(num_sets=2, in_features=390, num_layers=3, low_rank=64)
        >>> cross(torch.randn(2, 32, 390)).shape
        torch.Size([2, 32, 390])
    """

    def __init__(
        self,
        num_sets: int,
        in_features: int,
        num_layers: int,
        low_rank: int,
        num_weight_sets: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_sets = num_sets
        self.num_weight_sets = check_groups(num_sets, num_weight_sets)
        if in_features < 1 or num_layers < 1 or low_rank < 1:
            raise ValueError(
                f"in_features, num_layers and low_rank must be >= 1, got {in_features}, {num_layers}, {low_rank}"
            )
        self.in_features = in_features
        self.num_layers = num_layers
        self.low_rank = low_rank
        g = self.num_weight_sets
        self.W_kernels = nn.ParameterList(
            nn.Parameter(torch.empty(g, in_features, low_rank, device=device)) for _ in range(num_layers)
        )
        self.V_kernels = nn.ParameterList(
            nn.Parameter(torch.empty(g, low_rank, in_features, device=device)) for _ in range(num_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(g, in_features, device=device)) for _ in range(num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # xavier_normal_ of a [D, r] (or [r, D]) matrix: std = sqrt(2 / (D + r)).
        std = math.sqrt(2.0 / (self.in_features + self.low_rank))
        with torch.no_grad():
            for w_kernel, v_kernel, bias in zip(self.W_kernels, self.V_kernels, self.biases):
                w_kernel.normal_(0.0, std)
                v_kernel.normal_(0.0, std)
                bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, D]`` set-major.

        Returns:
            ``[K, B, D]``.
        """
        x0 = x.reshape(self.num_weight_sets, -1, self.in_features)
        xl = x0
        for w_kernel, v_kernel, bias in zip(self.W_kernels, self.V_kernels, self.biases):
            low = torch.bmm(xl, v_kernel.transpose(1, 2))
            projected = torch.baddbmm(bias.unsqueeze(1), low, w_kernel.transpose(1, 2))
            xl = torch.addcmul(xl, x0, projected)
        return xl.view(self.num_sets, -1, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"num_sets={self.num_sets}, in_features={self.in_features}, num_layers={self.num_layers}, "
            f"low_rank={self.low_rank}, num_weight_sets={self.num_weight_sets}"
        )


class PairwiseInnerProducts(nn.Module):
    r"""Inner products :math:`\langle e_i, e_j \rangle` of every field pair ``i < j`` (IPNN; DLRM's dot
    interaction), pairs in row-major order ``(0,1), (0,2), ..., (F-2,F-1)`` as the paper's code.

    Computed as a batched Gram matrix ``E E^T`` (a GEMM) and its strict upper triangle. No parameters.

    Args:
        num_fields: F.

    Example::

        >>> products = PairwiseInnerProducts(num_fields=39)
        >>> products(torch.randn(4, 32, 39, 10)).shape
        torch.Size([4, 32, 741])
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"pairwise products need at least 2 fields, got {num_fields}")
        self.num_fields = num_fields
        self.output_dim = num_fields * (num_fields - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, F, d]``.

        Returns:
            ``[K, B, F*(F-1)/2]``.
        """
        gram = torch.matmul(x, x.transpose(-1, -2))
        # Built per call, not a buffer: a buffer of a module built on `meta` would be garbage after DMP's to_empty.
        pairs = torch.triu_indices(self.num_fields, self.num_fields, offset=1, device=x.device)
        return gram[:, :, pairs[0], pairs[1]]


class FieldAwareInnerProducts(nn.Module):
    r"""Field-aware inner products (FFM): :math:`\langle e_i^{(j)}, e_j^{(i)} \rangle` of every field pair
    ``i < j``, pairs in the row-major order of :class:`PairwiseInnerProducts`.

    Each field's width-``d`` embedding holds ``F - 1`` sub-embeddings of width ``s = d // (F - 1)``, one per other
    field: ``e_i^{(j)}``, the one field ``i`` shows field ``j``, is columns ``[b*s, (b+1)*s)`` with
    ``b = j`` for ``j < i`` and ``b = j - 1`` for ``j > i``. The last ``d - (F - 1) * s`` columns (none when ``F - 1``
    divides ``d``) take part in no product. No parameters.

    Args:
        num_fields: F (at least 2).
        set_dim: d (at least F - 1).

    Example::

        >>> ffm = FieldAwareInnerProducts(num_fields=3, set_dim=4)  # s = 2
        >>> ffm.sub_dim, ffm(torch.randn(2, 8, 3, 4)).shape
        (2, torch.Size([2, 8, 3]))
    """

    def __init__(self, num_fields: int, set_dim: int) -> None:
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"field-aware products need at least 2 fields, got {num_fields}")
        if set_dim < num_fields - 1:
            raise ValueError(
                f"field-aware products: set width {set_dim} is below the {num_fields - 1} sub-embeddings each field "
                f"needs (one per other field); use a width of at least {num_fields - 1}, ideally a multiple of it"
            )
        self.num_fields = num_fields
        self.set_dim = set_dim
        self.sub_dim = set_dim // (num_fields - 1)
        self.output_dim = num_fields * (num_fields - 1) // 2

    def sub_embedding_block(self, field: int, partner: int) -> int:
        """The block ``b`` of field ``field``'s embedding that field ``partner`` meets (columns ``[b*s, (b+1)*s)``)."""
        if field == partner or not (0 <= field < self.num_fields and 0 <= partner < self.num_fields):
            raise ValueError(f"sub_embedding_block: need two different fields in 0..{self.num_fields - 1}, got "
                             f"{field}, {partner}")
        return partner if partner < field else partner - 1

    def sub_embedding_maps(self) -> torch.Tensor:
        r"""The sub-embeddings as linear maps in the cross layer's convention, ``[F*d, F*d]``: block
        ``[j*d:(j+1)*d, i*d:(i+1)*d]`` maps ``e_i`` to ``e_i^{(j)}`` (in its first ``s`` rows, the others zero), so
        the sub-embedding analysis of DCNv2's :math:`W_{i\to j}` reads FFM's too; the diagonal blocks are the
        identity (the field's whole embedding).

        Example::

            >>> maps = FieldAwareInnerProducts(num_fields=3, set_dim=2).sub_embedding_maps()
            >>> maps[2:4, 0:2]  # e_0 as field 1 sees it
            tensor([[1., 0.],
                    [0., 0.]])
        """
        f, d, s = self.num_fields, self.set_dim, self.sub_dim
        maps = torch.zeros(f * d, f * d)
        for i in range(f):
            for j in range(f):
                if i == j:
                    maps[j * d : (j + 1) * d, i * d : (i + 1) * d] = torch.eye(d)
                else:
                    b = self.sub_embedding_block(i, j)
                    maps[j * d : j * d + s, i * d + b * s : i * d + (b + 1) * s] = torch.eye(s)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, F, d]``.

        Returns:
            ``[K, B, F*(F-1)/2]``.
        """
        f, s = self.num_fields, self.sub_dim
        blocks = x[..., : (f - 1) * s].unflatten(-1, (f - 1, s))  # [K, B, F, F-1, s]
        # Built per call, not buffers (see PairwiseInnerProducts): for pair (i, j), i < j, field i's block j - 1
        # meets field j's block i.
        pairs = torch.triu_indices(f, f, offset=1, device=x.device)
        left = blocks[:, :, pairs[0], pairs[1] - 1]  # [K, B, P, s]
        right = blocks[:, :, pairs[1], pairs[0]]
        return (left * right).sum(dim=-1)


class FieldWeightedFM(nn.Module):
    r"""NFwFM's field-weighted bi-interaction per set: :math:`\sum_{i,j} r_{ij}\, e_i \odot e_j`.

    As the paper's code (``torchfm/model/fwfm.py``) the sum runs over all ordered pairs, the diagonal included, with
    a free ``[F, F]`` weight initialised standard-normal.

    Args:
        num_sets: K.
        num_fields: F.
        num_weight_sets: G (default K).
        device: where the parameters live.

    Example::

        >>> fwfm = FieldWeightedFM(num_sets=2, num_fields=39)
        >>> fwfm(torch.randn(2, 32, 39, 50)).shape
        torch.Size([2, 32, 50])
    """

    def __init__(
        self,
        num_sets: int,
        num_fields: int,
        num_weight_sets: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_sets = num_sets
        self.num_weight_sets = check_groups(num_sets, num_weight_sets)
        if num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields}")
        self.num_fields = num_fields
        self.weight = nn.Parameter(torch.empty(self.num_weight_sets, num_fields, num_fields, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, F, d]``.

        Returns:
            ``[K, B, d]``.
        """
        grouped = x.reshape(self.num_weight_sets, -1, self.num_fields, x.shape[-1])
        mixed = torch.einsum("gij,gnjd->gnid", self.weight, grouped)
        return (grouped * mixed).sum(dim=2).view(self.num_sets, -1, x.shape[-1])


class CompressedInteraction(nn.Module):
    r"""xDeepFM's compressed interaction network (CIN) per set, without split-half and without the final linear
    layer (the paper's ``CIN``): :math:`H^{l}_{c} = \mathrm{ReLU}(\sum_{i,h} W^{l}_{c,i,h}\, x^0_i \odot
    H^{l-1}_h + b^l_c)`, each layer's maps sum-pooled over the embedding width and concatenated.

    Computed without the ``[F * H, N * d]`` outer product the paper's code materialises: with ``W_c`` viewed as
    ``[F, H]``, ``sum_{i,h} W_{c,i,h} x0_i h_h = sum_i x0_i (W_c h)_i``, so each layer is one batched GEMM
    ``[C*F, H] @ [H, N*d]`` and a weighted sum over fields (same FLOPs, ``C/H`` of the memory of the outer
    product). Activations are field-major ``[G, F, N*d]``.

    Args:
        num_sets: K.
        num_fields: F.
        layer_sizes: feature maps per layer ((16, 16) in the paper).
        num_weight_sets: G (default K).
        device: where the parameters live.

    Example::

        >>> cin = CompressedInteraction(num_sets=2, num_fields=39, layer_sizes=(16, 16))
        >>> cin(torch.randn(2, 32, 39, 10)).shape
        torch.Size([2, 32, 32])
    """

    def __init__(
        self,
        num_sets: int,
        num_fields: int,
        layer_sizes: Sequence[int],
        num_weight_sets: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_sets = num_sets
        self.num_weight_sets = check_groups(num_sets, num_weight_sets)
        if num_fields < 1 or not layer_sizes or any(c < 1 for c in layer_sizes):
            raise ValueError(f"need num_fields >= 1 and positive layer sizes, got {num_fields}, {list(layer_sizes)}")
        self.num_fields = num_fields
        self.layer_sizes: List[int] = list(layer_sizes)
        self.output_dim = sum(self.layer_sizes)
        g = self.num_weight_sets
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        previous = num_fields
        for size in self.layer_sizes:
            self.weights.append(nn.Parameter(torch.empty(g, size, num_fields * previous, device=device)))
            self.biases.append(nn.Parameter(torch.empty(g, size, device=device)))
            previous = size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Conv1d(in, out, kernel_size=1)'s default: uniform in +-1/sqrt(in) for weight and bias.
        with torch.no_grad():
            for weight, bias in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(weight.shape[-1])
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, F, d]``.

        Returns:
            ``[K, B, sum(layer_sizes)]``.
        """
        g, f = self.num_weight_sets, self.num_fields
        x0 = x.reshape(g, -1, f, x.shape[-1]).permute(0, 2, 1, 3).flatten(2)  # [G, F, N*d] (one copy)
        hidden = x0
        pooled: List[torch.Tensor] = []
        for weight, bias, size in zip(self.weights, self.biases, self.layer_sizes):
            # weight [G, C, F*H] -> [G, C*F, H]: mixed[c, i] = W_c[i, :] @ hidden
            mixed = torch.bmm(weight.view(g, size * f, -1), hidden).view(g, size, f, -1)  # [G, C, F, N*d]
            maps = torch.relu((mixed * x0.unsqueeze(1)).sum(dim=2) + bias.unsqueeze(2))  # [G, C, N*d]
            hidden = maps
            pooled.append(maps.view(g, size, -1, x.shape[-1]).sum(dim=-1))  # [G, C, N]
        features = torch.cat(pooled, dim=1).transpose(1, 2)  # [G, N, sum C]
        return features.reshape(self.num_sets, -1, self.output_dim)


class TwoStreamMLP(nn.Module):
    """FinalMLP's two MLP streams per set, both on the set's concatenated embeddings (feature gating disabled, as
    the paper's code).

    The streams' first layers share their input, so they run as one batched Linear with the two streams' outputs
    concatenated (``[x-stream | y-stream]``; BatchNorm is per channel, so this is exactly two layers). Later layers
    run the ``2K`` (stream, set) pairs as virtual sets in stream-major order, so sets sharing a weight stay adjacent.

    Args:
        num_sets: K.
        in_features: F * d.
        layer_sizes: each stream's layer widths ((400, 400) in the paper).
        dropout: dropout after every layer.
        num_weight_sets: G (default K; 1 shares both streams across sets).
        device: where the parameters live.

    Example::

        >>> streams = TwoStreamMLP(num_sets=2, in_features=390, layer_sizes=(400, 400), dropout=0.2)
        >>> streams(torch.randn(2, 32, 390)).shape
        torch.Size([32, 2, 800])
    """

    def __init__(
        self,
        num_sets: int,
        in_features: int,
        layer_sizes: Sequence[int],
        dropout: float,
        num_weight_sets: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_sets = num_sets
        self.num_weight_sets = check_groups(num_sets, num_weight_sets)
        if not layer_sizes or any(h < 1 for h in layer_sizes):
            raise ValueError(f"layer_sizes must be non-empty and positive, got {list(layer_sizes)}")
        self.layer_sizes: List[int] = list(layer_sizes)
        self.in_features = in_features
        self.stream_dim = self.layer_sizes[-1]
        self.output_dim = 2 * self.stream_dim
        self.first = SetProjection(num_sets, in_features, 2 * self.layer_sizes[0], dropout, self.num_weight_sets,
                                   device=device)
        self.rest = nn.ModuleList(
            SetProjection(2 * num_sets, previous, size, dropout, 2 * self.num_weight_sets, device=device)
            for previous, size in zip(self.layer_sizes[:-1], self.layer_sizes[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, F*d]`` set-major.

        Returns:
            ``[B, K, 2 * layer_sizes[-1]]``: per set, the x stream's output then the y stream's.
        """
        k = self.num_sets
        hidden = self.first(x)  # [B, K, 2*H_0]
        for layer, previous, size in zip(self.rest, self.layer_sizes[:-1], self.layer_sizes[1:]):
            # [B, K, 2, H] -> stream-major virtual sets [2*K, B, H] (set v = stream * K + k)
            streams = hidden.view(-1, k, 2, previous).permute(2, 1, 0, 3).reshape(2 * k, -1, previous)
            out = layer(streams)  # [B, 2K, H']
            hidden = out.view(-1, 2, k, size).transpose(1, 2).reshape(-1, k, 2 * size)
        return hidden
