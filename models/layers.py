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

CPU fast path (measured on the 2-core AVX-512 CPU this package is developed on, torch 2.13 with MKL): an fp32 GEMM
whose widths are not a multiple of 8 runs at about half speed (``[2048, 390] x [390, 390]``: 70-120 GFLOP/s;
``[2048, 392] x [392, 392]``: about 190), and torch's batched GEMM is slower than the same GEMMs issued one by one
for the set arches' shapes. :func:`set_linear` (and the cross network in :mod:`multiembed.models.interactions`)
therefore issue one plain GEMM per set on CPU with every width zero-padded to a multiple of
:data:`GEMM_WIDTH_MULTIPLE`, inside an autograd function whose backward is written out. The padding is compute-only
(parameters keep their shapes; padded rows and columns are exact zeros and are sliced off), so the maths is the
same; on GPU the layers are the single batched kernel.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


# CPU GEMM widths are padded to a multiple of this (see the module docstring).
GEMM_WIDTH_MULTIPLE = 8


def per_set_gemms(x: torch.Tensor) -> bool:
    """True where the CPU fast path applies: one plain GEMM per set, widths padded (see the module docstring)."""
    return x.device.type == "cpu"


def gemm_width(width: int) -> int:
    """``width`` rounded up to a multiple of :data:`GEMM_WIDTH_MULTIPLE`."""
    return -(-width // GEMM_WIDTH_MULTIPLE) * GEMM_WIDTH_MULTIPLE


def _onednn_linear_op() -> Optional[Callable[..., torch.Tensor]]:
    """torch's oneDNN linear kernel (the one torch.compile's CPU backend emits), or None where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` for ``[N, in]`` and ``[out, in]`` CPU tensors, a fresh ``[N, out]`` tensor.

    float32 goes through oneDNN's GEMM (``torch.ops.mkldnn._linear_pointwise``): on the development CPU (AMD EPYC,
    AVX-512, torch 2.13) it runs the cross network's ``[2048, 392] x [392, 392]^T`` at about 215 GFLOP/s against
    MKL's 195-200 (``torch.mm``), which took the 16 forward GEMMs of an ME-DCNv2 step from 65 to 58 ms. Same maths,
    another summation order (float32 rounding-level differences). Other dtypes, or a build without the kernel, use
    ``torch.addmm`` / ``torch.mm``.

    Example::

        >>> x, weight, bias = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
        >>> torch.allclose(cpu_linear(x, weight, bias), x @ weight.t() + bias, atol=1e-6)
        True
    """
    if _ONEDNN_LINEAR is not None and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    if bias is None:
        return torch.mm(x, weight.t())
    return torch.addmm(bias, x, weight.t())


def pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with its last dimension zero-padded to ``width`` (``x`` itself when it is that wide already)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def pad_matrices(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[G, r, c]`` zero-padded to ``[G, rows, cols]`` (``weight`` itself when no padding is needed)."""
    if weight.shape[-2:] == (rows, cols):
        return weight
    padded = weight.new_zeros(weight.shape[0], rows, cols)
    padded[:, : weight.shape[1], : weight.shape[2]] = weight
    return padded


def pad_with_ones_column(x: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., D]`` -> ``[..., width]`` (``width > D``): ``x``, then a column of ones, then zeros (a fresh tensor).

    Example::

        >>> pad_with_ones_column(torch.tensor([[2.0, 3.0]]), 4).tolist()
        [[2.0, 3.0, 1.0, 0.0]]
    """
    features = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], width)
    out[..., :features] = x
    out[..., features] = 1.0
    out[..., features + 1 :] = 0.0
    return out


def ones_column_padded_base(x: torch.Tensor, width: int) -> Optional[torch.Tensor]:
    """The ``[..., width]`` tensor ``x`` is the leading columns of, when its storage already holds exactly what
    :func:`pad_with_ones_column` would build (a 1, then zeros, after each row); else None.

    The cross network returns such a view (its padded output, whose padding holds the bias column's 1 and zeros), so
    the projection after it reads that storage instead of copying the activations into a fresh padded tensor. The
    padding's values are checked, not assumed (two strided columns: negligible next to the copy).

    Example::

        >>> base = pad_with_ones_column(torch.randn(2, 3, 5), 8)
        >>> ones_column_padded_base(base[..., :5], 8) is not None, ones_column_padded_base(base[..., :5].clone(), 8)
        (True, None)
    """
    if x.dim() < 2 or x.shape[-1] >= width or x.numel() == 0:
        return None
    rows = x.numel() // x.shape[-1]
    expected = tuple(width * math.prod(x.shape[i + 1 : -1]) for i in range(x.dim() - 1)) + (1,)
    if x.stride() != expected or x.storage_offset() + rows * width > x.untyped_storage().nbytes() // x.element_size():
        return None
    base = x.as_strided((*x.shape[:-1], width), expected)
    padding = base[..., x.shape[-1] :]
    if not (bool((padding[..., 0] == 1).all()) and bool((padding[..., 1:] == 0).all())):
        return None
    return base


def weights_with_bias_column(weight: torch.Tensor, bias: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[G, out, in]`` and ``[G, out]`` -> ``[G, rows, cols]`` (``rows >= out``, ``cols > in``): ``W`` in the top-left
    block, ``b`` in column ``in``, zeros elsewhere, so that ``[x, 1, 0] @ W'^T = [x W^T + b, 0]``: the bias rides in
    the GEMM (the input carries the 1, :func:`pad_with_ones_column`) and its gradient is column ``in`` of the
    weight gradient ``dY^T [x, 1, 0]``.

    Example::

        >>> w = weights_with_bias_column(torch.ones(1, 2, 2), torch.tensor([[5.0, 6.0]]), 4, 4)
        >>> (pad_with_ones_column(torch.tensor([[1.0, 2.0]]), 4) @ w[0].t()).tolist()
        [[8.0, 9.0, 0.0, 0.0]]
    """
    out_features, in_features = weight.shape[1:]
    padded = weight.new_zeros(weight.shape[0], rows, cols)
    padded[:, :out_features, :in_features] = weight
    padded[:, :out_features, in_features] = bias
    return padded


class _SetLinearFunction(torch.autograd.Function):
    """``y[k] = x[k] @ W[g(k)]^T + b[g(k)]`` as one GEMM per set at padded widths, the output stored batch-major.

    Inputs and weights are zero-padded to GEMM-friendly widths (the padding contributes exact zeros, so the
    unpadded block of every result is unchanged). When the input width has padding, the bias rides in it
    (:func:`weights_with_bias_column`): no bias broadcast forward, and its gradient comes out of the weight-gradient
    GEMM instead of a reduction over the batch. Forward writes set ``k`` into columns ``[k*out, (k+1)*out)`` of a
    ``[B, K * out]`` buffer (the GEMM's leading dimension does the interleaving), so the BatchNorm that follows in
    :class:`SetProjection` reads it without a copy and the gradient it returns feeds the backward GEMMs in place.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        num_sets, batch, in_features = x.shape
        out_features = weight.shape[1]
        per_weight = num_sets // weight.shape[0]
        in_padded, out_padded = gemm_width(in_features), gemm_width(out_features)
        bias_in_gemm = bias is not None and in_padded > in_features
        bias_padded: Optional[torch.Tensor] = None
        if bias is not None and bias_in_gemm:
            base = ones_column_padded_base(x, in_padded)
            x_padded = pad_with_ones_column(x, in_padded) if base is None else base
            weight_padded = weights_with_bias_column(weight, bias, out_padded, in_padded)
        else:
            x_padded = pad_last(x, in_padded)
            weight_padded = pad_matrices(weight, out_padded, in_padded)
            bias_padded = None if bias is None else pad_last(bias, out_padded)
        out = x.new_empty(batch, num_sets, out_padded)
        for k in range(num_sets):
            g = k // per_weight
            if bias_padded is None:
                torch.mm(x_padded[k], weight_padded[g].t(), out=out[:, k])
            else:
                torch.addmm(bias_padded[g], x_padded[k], weight_padded[g].t(), out=out[:, k])
        ctx.save_for_backward(x_padded, weight_padded)
        ctx.widths = (in_features, out_features)
        ctx.has_bias = bias is not None
        ctx.bias_in_gemm = bias_in_gemm
        return out[..., :out_features].transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x_padded, weight_padded = ctx.saved_tensors
        in_features, out_features = ctx.widths
        num_sets = x_padded.shape[0]
        groups = weight_padded.shape[0]
        per_weight = num_sets // groups
        grad_padded = pad_last(grad, weight_padded.shape[1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x_padded, memory_format=torch.contiguous_format)
            for k in range(num_sets):
                torch.mm(grad_padded[k], weight_padded[k // per_weight], out=grad_x[k])
            grad_x = grad_x[..., :in_features]
        bias_needed = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] or (bias_needed and ctx.bias_in_gemm):
            grad_padded_weight = torch.empty_like(weight_padded, memory_format=torch.contiguous_format)
            for k in range(num_sets):
                if k % per_weight == 0:
                    torch.mm(grad_padded[k].t(), x_padded[k], out=grad_padded_weight[k // per_weight])
                else:
                    grad_padded_weight[k // per_weight].addmm_(grad_padded[k].t(), x_padded[k])
            if ctx.needs_input_grad[1]:
                grad_weight = grad_padded_weight[:, :out_features, :in_features].contiguous()  # the parameter's layout
            if bias_needed and ctx.bias_in_gemm:
                grad_bias = grad_padded_weight[:, :out_features, in_features].contiguous()
        if bias_needed and not ctx.bias_in_gemm:
            grad_bias = grad.sum(dim=1).view(groups, per_weight, -1).sum(dim=1)
        return grad_x, grad_weight, grad_bias


@torch.fx.wrap
def set_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """K set-specific linear layers: ``[K, B, in]`` x ``[G, out, in]`` (+ ``[G, out]``) -> ``[K, B, out]``.

    One batched GEMM on GPU (output set-major); on CPU one GEMM per set at padded widths (output a ``[K, B, out]``
    view of batch-major storage). Wrapped for fx: the device test is plain Python, outside the traced graph.

    Example::

        >>> x, weight, bias = torch.randn(3, 5, 7), torch.randn(3, 2, 7), torch.randn(3, 2)
        >>> torch.allclose(set_linear(x, weight, bias), torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)),
        ...                atol=1e-5)
        True
    """
    num_sets, groups = x.shape[0], weight.shape[0]
    if per_set_gemms(x):
        return _SetLinearFunction.apply(x, weight, bias)
    grouped = x.reshape(groups, -1, x.shape[-1])
    if bias is None:
        out = torch.bmm(grouped, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), grouped, weight.transpose(1, 2))
    return out.view(num_sets, -1, weight.shape[1])


def _check_groups(num_sets: int, num_weight_sets: Optional[int]) -> int:
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    groups = num_sets if num_weight_sets is None else num_weight_sets
    if groups < 1 or num_sets % groups:
        raise ValueError(f"num_weight_sets ({groups}) must be >= 1 and divide num_sets ({num_sets})")
    return groups


class BatchedLinear(nn.Module):
    """K independent ``Linear`` layers on set-major input, as one batched matmul (one GEMM per set on CPU).

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
        self.num_weight_sets = _check_groups(num_sets, num_weight_sets)
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
            ``[K, B, out_features]`` (on CPU a view of batch-major storage, see :func:`set_linear`).
        """
        return set_linear(x, self.weight, self.bias)

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
        self.num_weight_sets = _check_groups(num_sets, num_weight_sets)
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


# Elements per independently seeded random stream of a CPU dropout mask. A constant, not derived from the thread
# count, so that a seed draws the same masks whatever the number of threads.
MASK_CHUNK = 1 << 17

_mask_pool: Optional[ThreadPoolExecutor] = None
_mask_pool_key: Tuple[int, int] = (0, 0)
_mask_thread_state = threading.local()


def _mask_threads() -> Optional[ThreadPoolExecutor]:
    """The worker threads that draw mask chunks (None with one intra-op thread); rebuilt after a fork or a change of
    ``torch.set_num_threads``."""
    global _mask_pool, _mask_pool_key
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    key = (os.getpid(), threads)
    if _mask_pool is None or _mask_pool_key != key:
        _mask_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="multiembed-mask")
        _mask_pool_key = key
    return _mask_pool


def _seeded_generator(seed: int) -> torch.Generator:
    """This thread's generator, reseeded."""
    generator = getattr(_mask_thread_state, "generator", None)
    if generator is None:
        generator = _mask_thread_state.generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _for_each_chunk(work: Callable[[int], None], count: int) -> None:
    """``work(i)`` for every chunk index, on the mask threads (or here with one intra-op thread)."""
    pool = _mask_threads() if count > 1 else None
    if pool is None:
        for i in range(count):
            work(i)
    else:
        list(pool.map(work, range(count)))


def _stream_base() -> int:
    """The seed of chunk 0 of a new mask (chunk ``i`` uses ``base + i``), from torch's default generator."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def uniform_like(x: torch.Tensor) -> torch.Tensor:
    """Uniform ``[0, 1)`` floats shaped like ``x`` (same distribution as ``torch.rand_like``), drawn in parallel on CPU.

    Why not ``torch.rand_like``: torch's CPU ``uniform_`` runs on one thread (one mt19937 behind a lock), so on the
    2-core development machine the ``[2048, 4, 400]`` dropout mask of an ME-DCNv2 step (9 ms) left a core idle. Here
    the tensor is cut into chunks of :data:`MASK_CHUNK` elements, each filled from its own generator seeded with
    ``base + i`` (``base`` drawn from torch's default generator, so ``torch.manual_seed`` governs it; consecutive seeds
    per stream as DataLoader seeds its workers), on ``torch.get_num_threads()`` threads (``uniform_`` releases the
    GIL). The chunking is fixed, so the values depend on the seed only, not on the thread count. Other devices use
    ``torch.rand_like``.

    Example::

        >>> u = uniform_like(torch.empty(3, 1_000_000))
        >>> u.shape, bool(u.min() >= 0) and bool(u.max() < 1), abs(float(u.mean()) - 0.5) < 0.01
        (torch.Size([3, 1000000]), True, True)
    """
    if x.device.type != "cpu":
        return torch.rand_like(x, memory_format=torch.contiguous_format)
    out = torch.empty(x.shape, dtype=x.dtype)
    chunks = out.view(-1).split(MASK_CHUNK)
    base = _stream_base()

    def fill(i: int) -> None:
        chunks[i].uniform_(generator=_seeded_generator(base + i))

    _for_each_chunk(fill, len(chunks))
    return out


def dropout_scale(p: float) -> float:
    """``1 / (1 - p)``, the factor of the kept elements (as ``nn.Dropout``)."""
    return 1.0 / (1.0 - p)


@torch.fx.wrap
def uniform_mask_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout in training: ``x * keep`` with ``keep = 1 / (1 - p)`` where ``uniform >= p``, else 0.

    Wrapped for fx: :func:`uniform_like` branches on the device in plain Python.

    Example::

        >>> out = uniform_mask_dropout(torch.ones(100_000), 0.2)
        >>> sorted(set(out.tolist())), 0.79 < float((out > 0).float().mean()) < 0.81
        ([0.0, 1.25], True)
    """
    keep = uniform_like(x).ge_(p).mul_(dropout_scale(p))
    return x * keep


class _ReLUDropoutFunction(torch.autograd.Function):
    r"""``relu(x) * keep`` (``keep`` as :func:`uniform_mask_dropout`), with one saved tensor: the output.

    Forward is exactly ``torch.relu`` followed by the dropout multiply. Backward uses that an output element is
    positive exactly where ``x > 0`` and the element was kept (``1 / (1 - p) > 1`` never rounds a positive product
    to 0), so :math:`\partial L / \partial x = \text{threshold\_backward}(g, \text{out}, 0) / (1 - p)`: the
    values autograd computes through ReLU and dropout (``g * keep`` masked where ``x <= 0``), without keeping the
    mask alive until backward.

    (Fusing the mask into the ReLU chunk by chunk on the mask threads, while each chunk's uniforms are in cache,
    measured slower here: 12 against 8 ms for ``[2048, 4, 400]``, the per-block Python calls and the GIL cost more
    than the memory passes they save.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = uniform_like(x).ge_(p).mul_(dropout_scale(p))
        out = torch.relu(x).mul_(keep)
        ctx.save_for_backward(out)
        ctx.scale = dropout_scale(p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0.0).mul_(ctx.scale), None


@torch.fx.wrap
def relu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(relu(x))`` in training (inverted dropout with probability ``p``, mask as :func:`uniform_like`).

    Example::

        >>> x = torch.randn(100_000)
        >>> out = relu_dropout(x, 0.2)
        >>> bool(((out == 0) | (out == 1.25 * x)).all()), bool((out[x <= 0] == 0).all())
        (True, True)
    """
    return _ReLUDropoutFunction.apply(x, p)


class UniformMaskDropout(nn.Module):
    """Inverted dropout as ``nn.Dropout`` computes it (each element kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)`` in training, the identity in eval), with the mask drawn as ``uniform >= p`` by
    :func:`uniform_like`.

    Why not ``nn.Dropout``: on CPU its mask comes from ``bernoulli_``, which runs single-threaded at about three
    times the cost of ``torch.rand_like`` (torch 2.13; 24 ms against 9 ms for the ``[2048, 4, 400]`` projection
    output), and :func:`uniform_like` draws on every intra-op thread. The distribution of the mask is the same; the
    random stream (which elements a given seed drops) differs.

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
    """``ReLU`` then :class:`UniformMaskDropout`, in one autograd node (:func:`relu_dropout`).

    The same values as ``UniformMaskDropout(p)(torch.relu(x))`` forward and backward, for one pass fewer backward
    and no mask kept until backward (the ``[B, K, H]`` projection output is the largest activation of a step).

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


def set_major(embeddings: torch.Tensor) -> torch.Tensor:
    """``[B, K, F, d]`` -> ``[K, B, F, d]``; free (a view) when the input is the sparse arch's output, whose storage
    is set-major already."""
    return embeddings.transpose(0, 1)


def flatten_fields(embeddings: torch.Tensor) -> torch.Tensor:
    """``[B, K, F, d]`` -> set-major ``[K, B, F*d]`` (each set's concatenated field embeddings); a view for the
    sparse arch's output."""
    return set_major(embeddings).flatten(2)
