"""Building blocks that run K set-specific layers as one batched kernel.

Set-major layout: activations of the K sets are stored as ``[K, B, ...]`` (set, batch, features), so set ``k``'s
rows are one contiguous block and K independent ``Linear`` layers are one ``torch.baddbmm`` with a ``[K, in, out]``
weight. The number of kernels does not grow with K.

Weight sharing (the paper's ``mesi`` ablation, FinalMLP's two streams): a layer over ``K`` sets holds
``G = num_weight_sets`` weights, ``G`` dividing ``K``; set ``k`` uses weight ``k // (K // G)``. Consecutive sets
share a weight, so ``[K, B, in]`` is viewed as ``[G, (K // G) * B, in]`` and the shared case is the same single
batched matmul over more rows, never a copy of the weight.

Every module here implements ``reset_parameters`` for its own parameters: DMP materialises modules built on the
``meta`` device (and modules it moves between devices) with ``module.apply(reset_parameters)``.

On CPU the layers take the fast path of :mod:`multiembed.models.cpu_fastpath` (one GEMM per set at padded widths
with a written-out backward, dropout masks drawn on every thread) when :func:`~multiembed.models.cpu_fastpath.enabled`
says so; the batched ops here are the reference path, and the path GPUs run.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from multiembed.models import cpu_fastpath


@torch.fx.wrap
def per_set_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """K set-specific linear layers: ``[K, B, in]`` x ``[G, out, in]`` (+ ``[G, out]``) -> ``[K, B, out]``.

    The reference path is one batched GEMM (output set-major); where :func:`~multiembed.models.cpu_fastpath.enabled`
    it is :func:`multiembed.models.cpu_fastpath.per_set_linear` (one GEMM per set at padded widths, output a
    ``[K, B, out]`` view of batch-major storage). Wrapped for fx: the switch is plain Python, read at run time.

    Example::

        >>> x, weight, bias = torch.randn(3, 5, 7), torch.randn(3, 2, 7), torch.randn(3, 2)
        >>> torch.allclose(per_set_linear(x, weight, bias), torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)),
        ...                atol=1e-5)
        True
    """
    num_sets, groups = x.shape[0], weight.shape[0]
    if cpu_fastpath.enabled(x):
        return cpu_fastpath.per_set_linear(x, weight, bias)
    grouped = x.reshape(groups, -1, x.shape[-1])
    if bias is None:
        out = torch.bmm(grouped, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), grouped, weight.transpose(1, 2))
    return out.view(num_sets, -1, weight.shape[1])


@torch.fx.wrap
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear``; where :func:`~multiembed.models.cpu_fastpath.enabled`, for a ``[N, in]`` input whose widths are
    multiples of :data:`~multiembed.models.cpu_fastpath.GEMM_WIDTH_MULTIPLE`,
    :func:`multiembed.models.cpu_fastpath.linear` (its backward GEMMs on the forward's kernel). Wrapped for fx.

    Example::

        >>> x, weight, bias = torch.randn(5, 8), torch.randn(16, 8), torch.randn(16)
        >>> torch.allclose(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
        True
    """
    multiple = cpu_fastpath.GEMM_WIDTH_MULTIPLE
    if (cpu_fastpath.enabled(x) and x.dim() == 2 and weight.shape[0] % multiple == 0
            and weight.shape[1] % multiple == 0):
        return cpu_fastpath.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state-dict keys) whose forward is :func:`linear`.

    Example::

        >>> Linear(8, 16)(torch.randn(4, 8)).shape
        torch.Size([4, 16])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[N, in_features]`` (any leading shape off the fast path).

        Returns:
            ``[N, out_features]``.
        """
        return linear(x, self.weight, self.bias)


def check_groups(num_sets: int, num_weight_sets: Optional[int]) -> int:
    """The number of distinct weight groups over ``num_sets`` sets (default: one per set).

    Raises:
        ValueError: ``num_sets < 1``, or a group count that does not divide ``num_sets``.
    """
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    groups = num_sets if num_weight_sets is None else num_weight_sets
    if groups < 1 or num_sets % groups:
        raise ValueError(f"num_weight_sets ({groups}) must be >= 1 and divide num_sets ({num_sets})")
    return groups


class BatchedLinear(nn.Module):
    """K independent ``Linear`` layers on set-major input, as one batched matmul (one GEMM per set on the CPU fast
    path, :func:`per_set_linear`).

    ``y[k] = x[k] @ weight[g(k)]^T + bias[g(k)]`` with ``g(k) = k // (K // G)``. Initialised per set exactly as
    ``nn.Linear`` (uniform in ``+-1/sqrt(in_features)`` for weight and bias).

    Args:
        num_sets: K, the number of sets in the input.
        in_features: input width.
        out_features: output width.
        num_weight_sets: G, the number of distinct weights (default K; 1 shares one layer across all sets).
        bias: add a bias.
        device: where the parameters live.

    Example::

        >>> layer = BatchedLinear(num_sets=4, in_features=390, out_features=400)
        >>> layer(torch.randn(4, 32, 390)).shape
        torch.Size([4, 32, 400])
    """

    def __init__(
        self,
        num_sets: int,
        in_features: int,
        out_features: int,
        num_weight_sets: Optional[int] = None,
        bias: bool = True,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_sets = num_sets
        self.num_weight_sets = check_groups(num_sets, num_weight_sets)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(self.num_weight_sets, out_features, in_features, device=device))
        self.bias: Optional[nn.Parameter] = (
            nn.Parameter(torch.empty(self.num_weight_sets, out_features, device=device)) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, in_features]`` (on GPU copied when not contiguous).

        Returns:
            ``[K, B, out_features]`` (on the CPU fast path a view of batch-major storage, see :func:`per_set_linear`).
        """
        return per_set_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"num_sets={self.num_sets}, in_features={self.in_features}, out_features={self.out_features}, "
            f"num_weight_sets={self.num_weight_sets}, bias={self.bias is not None}"
        )


class SetBatchNorm(nn.Module):
    """BatchNorm with statistics per set: ``[B, K, H] -> [B, K, H]``, never pooled across sets.

    One ``BatchNorm1d(K * H)`` over the flattened sets, so every (set, unit) channel has its own batch statistics
    and running averages. With ``num_weight_sets = G < K`` (shared interaction) the affine scale and shift are
    shared by the sets of a group, as when the paper's code calls one shared module on each set in turn; the running
    averages stay per set (the paper's shared module keeps one running average updated by every set).

    Args:
        num_sets: K.
        num_features: H, units per set.
        num_weight_sets: G, the number of distinct affine parameter sets (default K).
        eps: as ``nn.BatchNorm1d``.
        momentum: as ``nn.BatchNorm1d``.
        device: where parameters and buffers live.

    Example::

        >>> norm = SetBatchNorm(num_sets=4, num_features=400)
        >>> norm(torch.randn(32, 4, 400)).shape
        torch.Size([32, 4, 400])
    """

    def __init__(
        self,
        num_sets: int,
        num_features: int,
        num_weight_sets: Optional[int] = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_sets = num_sets
        self.num_weight_sets = check_groups(num_sets, num_weight_sets)
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        shared = self.num_weight_sets != num_sets
        self.batch_norm = nn.BatchNorm1d(num_sets * num_features, eps=eps, momentum=momentum, affine=not shared,
                                         device=device)
        self.weight: Optional[nn.Parameter] = None
        self.bias: Optional[nn.Parameter] = None
        if shared:
            self.weight = nn.Parameter(torch.empty(self.num_weight_sets, 1, num_features, device=device))
            self.bias = nn.Parameter(torch.empty(self.num_weight_sets, 1, num_features, device=device))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None and self.bias is not None:
            with torch.no_grad():
                self.weight.fill_(1.0)
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[B, K, H]`` (any strides).

        Returns:
            ``[B, K, H]``, contiguous.
        """
        normed = self.batch_norm(x.reshape(-1, self.num_sets * self.num_features))
        if self.weight is None or self.bias is None:
            return normed.view(-1, self.num_sets, self.num_features)
        grouped = normed.view(-1, self.num_weight_sets, self.num_sets // self.num_weight_sets, self.num_features)
        return torch.addcmul(self.bias, grouped, self.weight).view(-1, self.num_sets, self.num_features)


@torch.fx.wrap
def uniform_mask_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout in training: each element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``.

    The reference path is ``F.dropout``; where :func:`~multiembed.models.cpu_fastpath.enabled` it is
    :func:`multiembed.models.cpu_fastpath.dropout` (the same distribution, the mask drawn on every thread, another
    random stream). Wrapped for fx: the switch is plain Python, read at run time.

    Example::

        >>> out = uniform_mask_dropout(torch.ones(100_000), 0.2)
        >>> sorted(set(out.tolist())), 0.79 < float((out > 0).float().mean()) < 0.81
        ([0.0, 1.25], True)
    """
    if cpu_fastpath.enabled(x):
        return cpu_fastpath.dropout(x, p)
    return F.dropout(x, p, training=True)


@torch.fx.wrap
def relu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(relu(x))`` in training (inverted dropout with probability ``p``).

    The reference path is ``F.dropout(F.relu(x))``; where :func:`~multiembed.models.cpu_fastpath.enabled` it is
    :func:`multiembed.models.cpu_fastpath.relu_dropout` (one autograd node that keeps no mask until backward).
    Wrapped for fx: the switch is plain Python, read at run time.

    Example::

        >>> x = torch.randn(100_000)
        >>> out = relu_dropout(x, 0.2)
        >>> bool(((out == 0) | (out == 1.25 * x)).all()), bool((out[x <= 0] == 0).all())
        (True, True)
    """
    if cpu_fastpath.enabled(x):
        return cpu_fastpath.relu_dropout(x, p)
    return F.dropout(F.relu(x), p, training=True)


class UniformMaskDropout(nn.Module):
    """Inverted dropout as ``nn.Dropout`` computes it (each element kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)`` in training, the identity in eval), on CPU with the fast path's mask drawn on every intra-op
    thread (:func:`uniform_mask_dropout`).

    The distribution of the mask is ``nn.Dropout``'s; on the fast path the random stream (which elements a given
    seed drops) differs.

    Args:
        p: probability of dropping an element, in ``[0, 1)``.

    Example::

        >>> dropout = UniformMaskDropout(0.2)
        >>> kept = dropout(torch.ones(100_000))
        >>> 0.79 < float((kept > 0).float().mean()) < 0.81, float(kept.max())
        (True, 1.25)
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: any shape.

        Returns:
            ``x`` with dropped elements zeroed and the rest scaled (training), or ``x`` (eval).
        """
        if not self.training or self.p == 0.0:
            return x
        return uniform_mask_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLUDropout(UniformMaskDropout):
    """``ReLU`` then :class:`UniformMaskDropout` (:func:`relu_dropout`; one autograd node on the fast path).

    The same values as ``UniformMaskDropout(p)(torch.relu(x))`` forward and backward; on the fast path one pass
    fewer backward and no mask kept until backward (the ``[B, K, H]`` projection output is the largest activation
    of a step).

    Args:
        p: probability of dropping an element, in ``[0, 1)``.

    Example::

        >>> activation = ReLUDropout(0.2).eval()
        >>> activation(torch.tensor([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: any shape.

        Returns:
            ``relu(x)`` with dropped elements zeroed and the rest scaled (training), or ``relu(x)`` (eval).
        """
        if not self.training or self.p == 0.0:
            return torch.relu(x)
        return relu_dropout(x, self.p)


class SetProjection(nn.Module):
    """The paper's non-linear projection ``P_m`` per set: Linear -> BatchNorm -> ReLU -> Dropout.

    Without the non-linearity multi-embedding collapses to single-embedding (the paper, section 4), so every
    set's branch ends with this.

    Args:
        num_sets: K.
        in_features: width of each set's interaction output.
        out_features: projection width (400 in the paper).
        dropout: dropout probability.
        num_weight_sets: G (default K; 1 for one projection shared by all sets).
        device: where the parameters live.

    Example::

        >>> projection = SetProjection(num_sets=4, in_features=390, out_features=400, dropout=0.2)
        >>> projection(torch.randn(4, 32, 390)).shape
        torch.Size([32, 4, 400])
    """

    def __init__(
        self,
        num_sets: int,
        in_features: int,
        out_features: int,
        dropout: float,
        num_weight_sets: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_sets = num_sets
        self.in_features = in_features
        self.out_features = out_features
        self.linear = BatchedLinear(num_sets, in_features, out_features, num_weight_sets, device=device)
        self.norm = SetBatchNorm(num_sets, out_features, num_weight_sets, device=device)
        self.relu_dropout = ReLUDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[K, B, in_features]`` set-major.

        Returns:
            ``[B, K, out_features]`` batch-major (ready for the mean over sets).
        """
        hidden = self.linear(x).transpose(0, 1)
        return self.relu_dropout(self.norm(hidden))


def as_set_major(embeddings: torch.Tensor) -> torch.Tensor:
    """``[B, K, F, d]`` -> ``[K, B, F, d]``; free (a view) when the input is the sparse arch's output, whose storage
    is set-major already."""
    return embeddings.transpose(0, 1)


def flatten_fields(embeddings: torch.Tensor) -> torch.Tensor:
    """``[B, K, F, d]`` -> set-major ``[K, B, F*d]`` (each set's concatenated field embeddings); a view for the
    sparse arch's output."""
    return as_set_major(embeddings).flatten(2)
