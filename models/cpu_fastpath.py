"""The CPU fast path of the dense layers, behind one switch; the plain batched ops of
:mod:`multiembed.models.layers` and :mod:`multiembed.models.interactions` are the reference.

What is here (each the same maths as the reference, with its backward written out where autograd would be slower):

* :func:`per_set_linear`: K set-specific ``Linear`` layers as one GEMM per set at padded widths
  (:data:`GEMM_WIDTH_MULTIPLE`), the bias carried in a padded column, the output stored batch-major for the
  BatchNorm that follows;
* :func:`cross_network`: DCNv2's full-rank cross layers the same way (:class:`_CrossNetFunction`);
* :func:`keep_mask`, :func:`dropout`, :func:`relu_dropout`: inverted dropout whose mask comes from a counter-based
  stream (:func:`splitmix64`) computed on every intra-op thread (torch's CPU random draws run on one), ReLU and
  dropout fused into one autograd node;
* :func:`cpu_linear` / :func:`gemm_backend`: the GEMM kernel, chosen per machine and dtype.

Why: on CPU, GEMMs whose widths are not a multiple of 8 and torch's batched GEMM run well below the machine's GEMM
rate for the set arches' shapes, and torch draws dropout masks on one thread. Figures, and the alternatives that were
measured and rejected, are in ``benchmarks/README.md`` ("CPU fast path: measurements and rejected alternatives").

The switch: the layers call :func:`enabled` on their input and take the fast path only when it returns True: the
global setting is on (default; ``MULTIEMBED_FAST_PATH=0`` in the environment, :func:`set_fast_path` or the
:func:`use_fast_path` context manager turn it off), the tensor is on CPU, and either CPU autocast is off and its dtype
is in :data:`FAST_DTYPES`, or CPU autocast is on in bfloat16 (``--precision bf16``) on a CPU with native bf16
(:func:`~multiembed.models.precision.cpu_bf16_supported`) and its dtype is in :data:`AUTOCAST_INPUT_DTYPES`.
Everything else (GPU, ``meta``, half precision outside autocast, float16 autocast) runs the reference path. The
switch is read at call time inside functions the layers wrap for ``torch.fx``, so traced models (TorchRec's
pipeline) follow it too.

Under bf16 autocast the same kernels run in bfloat16: the GEMM Functions (:class:`_LinearFunction`,
:class:`_SetLinearFunction`, :class:`_CrossNetFunction`) cast their floating inputs (activations and the fp32 master
weights) to bfloat16 once on entry and run with autocast off inside
(``torch.amp.custom_fwd(cast_inputs=torch.bfloat16)`` / ``custom_bwd``); their GEMMs (``addmm`` / ``mm``,
:func:`gemm_backend`) accumulate in fp32 and round their outputs to bfloat16, as autocast's ``baddbmm`` on the
reference path does. The set linear layers write the input gradient in the input's own dtype (fp32 for the embeddings)
as they copy it out of the GEMMs; autograd casts the other bfloat16 gradients of fp32 inputs (the parameters', the
cross network's input's) to fp32. One difference from the reference path: the cross layers' running sum
``x_{l+1} = x_0 * P_l + x_l`` is bfloat16 here, fp32 there (autocast's ``addcmul`` promotes to its fp32 operand);
``tests/test_models_fastpath.py`` bounds the two paths' difference. The element-wise steps (:func:`dropout`,
:func:`relu_dropout`) run in their input's dtype, as autocast leaves those ops; BatchNorm between them is torch's,
whose statistics and running averages stay fp32 for a bfloat16 input. Outside autocast nothing is cast (``custom_fwd``
is a no-op there).

This module is plain torch (no TorchRec), like the layers that call it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from multiembed.models.precision import cpu_bf16_supported, cpu_capability

# --------------------------------------------------------------------------------------------------------------------
# The switch

FAST_PATH_ENV = "MULTIEMBED_FAST_PATH"
# dtypes the fast path runs outside autocast; others (bfloat16, float16) take the reference path there.
FAST_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)
# Input dtypes the fast path takes under CPU bf16 autocast (its GEMM Functions cast them to AUTOCAST_DTYPE); a
# float64 input keeps the reference path there (autocast leaves float64 ops alone).
AUTOCAST_DTYPE = torch.bfloat16
AUTOCAST_INPUT_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)

_OFF_VALUES = ("0", "false", "off", "no")
_ON_VALUES = ("", "1", "true", "on", "yes")


def _setting_from_env() -> bool:
    value = os.environ.get(FAST_PATH_ENV, "1").strip().lower()
    if value in _OFF_VALUES:
        return False
    if value in _ON_VALUES:
        return True
    raise ValueError(f"{FAST_PATH_ENV}={os.environ[FAST_PATH_ENV]!r}: expected 1 (fast path on) or 0 (off)")


_fast_path_on = _setting_from_env()


def fast_path_on() -> bool:
    """The global setting (True unless ``MULTIEMBED_FAST_PATH=0`` or :func:`set_fast_path` turned it off)."""
    return _fast_path_on


def set_fast_path(on: bool) -> bool:
    """Turns the fast path on or off for the whole process; returns the previous setting."""
    global _fast_path_on
    previous, _fast_path_on = _fast_path_on, bool(on)
    return previous


@contextlib.contextmanager
def use_fast_path(on: bool) -> Iterator[None]:
    """The fast path on or off inside a ``with`` block (the previous setting is restored on exit).

    Example::

        >>> with use_fast_path(False):
        ...     enabled(torch.ones(2))
        False
        >>> enabled(torch.ones(2)) == fast_path_on()
        True
    """
    previous = set_fast_path(on)
    try:
        yield
    finally:
        set_fast_path(previous)


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    """:func:`~multiembed.models.precision.cpu_bf16_supported`, asked once per process (it cannot change)."""
    return cpu_bf16_supported()


def enabled(x: torch.Tensor) -> bool:
    """True where the layers take the fast path for input ``x``: setting on, ``x`` on CPU, and either autocast off
    and ``x``'s dtype in :data:`FAST_DTYPES`, or CPU autocast on in bfloat16 on a CPU with native bf16 and ``x``'s
    dtype in :data:`AUTOCAST_INPUT_DTYPES` (the kernels then run in bfloat16).

    Example::

        >>> enabled(torch.ones(2, dtype=torch.bfloat16)), enabled(torch.ones(2, device="meta"))
        (False, False)
        >>> with torch.autocast("cpu", dtype=torch.float16):
        ...     enabled(torch.ones(2))
        False
    """
    if not _fast_path_on or x.device.type != "cpu":
        return False
    if not torch.is_autocast_enabled("cpu"):
        return x.dtype in FAST_DTYPES
    return torch.get_autocast_dtype("cpu") == AUTOCAST_DTYPE and x.dtype in AUTOCAST_INPUT_DTYPES and _native_bf16()


# --------------------------------------------------------------------------------------------------------------------
# GEMM kernel per machine and dtype

# CPU GEMM widths are padded to a multiple of this.
GEMM_WIDTH_MULTIPLE = 8


def gemm_width(width: int) -> int:
    """``width`` rounded up to a multiple of :data:`GEMM_WIDTH_MULTIPLE`."""
    return -(-width // GEMM_WIDTH_MULTIPLE) * GEMM_WIDTH_MULTIPLE


def _linear_pointwise() -> Callable[..., torch.Tensor]:
    """The private oneDNN op (raises where this build lacks it)."""
    return torch.ops.mkldnn._linear_pointwise.default


def working_onednn_linear(dtype: torch.dtype) -> Optional[Callable[..., torch.Tensor]]:
    """torch's oneDNN linear kernel (``torch.ops.mkldnn._linear_pointwise``, a private op: the one torch.compile's
    CPU backend emits) for ``dtype`` where a tiny probe call returns the right values, else None (the op is missing,
    raises, or is wrong for ``dtype``).

    Probes on every call (the fast path caches its own choice, :func:`gemm_backend`); benchmarks time the op as one
    of the GEMM kernels this torch offers on the machine.

    Example::

        >>> working_onednn_linear(torch.float64) is None or callable(working_onednn_linear(torch.float64))
        True
    """
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype in FAST_DTYPES else {"rtol": 1e-2, "atol": 1e-2}
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = _linear_pointwise()
        x = (torch.arange(6, dtype=torch.float32).view(2, 3) / 8).to(dtype)
        weight = (torch.arange(12, dtype=torch.float32).view(4, 3) / 16).to(dtype)
        bias = (torch.arange(4, dtype=torch.float32) / 4).to(dtype)
        got = op(x, weight, bias, "none", [], "")
        if got.dtype != dtype or not torch.allclose(got, torch.addmm(bias, x, weight.t()), **tolerance):
            return None
    except Exception:  # noqa: BLE001 - the op is private: a missing or changed op means "use addmm"
        return None
    return op


@functools.lru_cache(maxsize=None)
def _onednn_linear(dtype: torch.dtype) -> Optional[Callable[..., torch.Tensor]]:
    """:func:`working_onednn_linear` where it is the better choice: float32 on AVX-512 CPUs only (on an AVX2-only CPU
    it was slower than ``addmm``). For bfloat16, ``addmm`` / ``mm`` already run oneDNN's matmul, which reads
    transposed operands in place where this op copies them (the backward GEMMs' transposed views), and some builds
    raise for bfloat16 here; figures in ``benchmarks/README.md``."""
    if dtype != torch.float32 or not cpu_capability().startswith("AVX512"):
        return None
    return working_onednn_linear(dtype)


def gemm_backend(dtype: torch.dtype) -> str:
    """The GEMM :func:`cpu_linear` uses for ``dtype`` on this machine: ``"onednn"`` or ``"addmm"`` (for reports).

    Example::

        >>> gemm_backend(torch.float64)
        'addmm'
    """
    return "onednn" if _onednn_linear(dtype) is not None else "addmm"


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` for ``[N, in]`` and ``[out, in]`` CPU tensors, a fresh ``[N, out]`` tensor.

    oneDNN's GEMM where :func:`gemm_backend` chose it (same maths, another summation order: float32 rounding-level
    differences), else ``torch.addmm`` / ``torch.mm``.

    Example::

        >>> x, weight, bias = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
        >>> torch.allclose(cpu_linear(x, weight, bias), x @ weight.t() + bias, atol=1e-6)
        True
    """
    op = _onednn_linear(x.dtype) if weight.dtype == x.dtype else None
    if op is not None:
        return op(x, weight, bias, "none", [], "")
    if bias is None:
        return torch.mm(x, weight.t())
    return torch.addmm(bias, x, weight.t())


def cpu_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``[N, k]`` and ``[k, M]`` CPU matrices of any strides (transposed and row-strided views
    included), a fresh ``[N, M]`` tensor: the GEMM of :func:`cpu_linear` (oneDNN's where chosen, reading ``b`` as the
    transposed weight ``b^T`` without a copy), so the backward passes run on the same kernel as the forward.

    Example::

        >>> a, b = torch.randn(6, 4), torch.randn(5, 4)
        >>> torch.allclose(cpu_mm(a, b.t()), a @ b.t(), atol=1e-6)
        True
    """
    return cpu_linear(a, b.t())


# --------------------------------------------------------------------------------------------------------------------
# Padding: compute-only (parameters keep their shapes; padded rows and columns are exact zeros and are sliced off)


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


# --------------------------------------------------------------------------------------------------------------------
# Autocast: the GEMM Functions below run in bfloat16 under CPU bf16 autocast (see the module docstring)

_cast_forward = torch.amp.custom_fwd(device_type="cpu", cast_inputs=AUTOCAST_DTYPE)


def _autocast_forward(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Decorates a GEMM Function's ``forward(ctx, *inputs)``: under CPU autocast its floating inputs are cast to
    :data:`AUTOCAST_DTYPE` once and it runs with autocast off (``torch.amp.custom_fwd(cast_inputs=...)``; a plain
    call outside autocast). ``ctx.input_dtypes`` keeps the inputs' own dtypes (None for non-tensors), so backward can
    write a gradient in its input's dtype in a pass it makes anyway (autograd would cast it in one more pass)."""
    cast = _cast_forward(forward)

    @functools.wraps(forward)
    def wrapped(ctx, *inputs):  # type: ignore[no-untyped-def]
        ctx.input_dtypes = tuple(x.dtype if isinstance(x, torch.Tensor) else None for x in inputs)
        return cast(ctx, *inputs)

    return wrapped


# Backward with the forward's autocast state (off inside the Functions above).
_autocast_backward = torch.amp.custom_bwd(device_type="cpu")


# --------------------------------------------------------------------------------------------------------------------
# One linear layer (the over arch's)


class _LinearFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` with all three GEMMs (forward, input and weight gradients) on :func:`cpu_linear`'s kernel;
    autograd's own backward of ``F.linear`` runs its two GEMMs on ``torch.mm``."""

    @staticmethod
    @_autocast_forward
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return cpu_linear(x, weight, bias)

    @staticmethod
    @_autocast_backward
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = cpu_mm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = cpu_mm(grad.t(), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` for a ``[N, in]`` CPU input with the backward on the forward's GEMM kernel (:class:`_LinearFunction`).

    Example::

        >>> x, weight, bias = torch.randn(5, 8), torch.randn(16, 8), torch.randn(16)
        >>> torch.allclose(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
        True
    """
    return _LinearFunction.apply(x, weight, bias)


# --------------------------------------------------------------------------------------------------------------------
# K set-specific linear layers


class _SetLinearFunction(torch.autograd.Function):
    """``y[k] = x[k] @ W[g(k)]^T + b[g(k)]`` as one GEMM per set at padded widths, the output stored batch-major.

    Inputs and weights are zero-padded to GEMM-friendly widths (the padding contributes exact zeros, so the
    unpadded block of every result is unchanged). When the input width has padding, the bias rides in it
    (:func:`weights_with_bias_column`): no bias broadcast forward, and its gradient comes out of the weight-gradient
    GEMM instead of a reduction over the batch. Forward writes set ``k`` into columns ``[k*out, (k+1)*out)`` of a
    ``[B, K * out]`` buffer (the GEMM's leading dimension does the interleaving), so the BatchNorm that follows in
    ``SetProjection`` reads it without a copy and the gradient it returns feeds the backward GEMMs in place.
    """

    @staticmethod
    @_autocast_forward
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
            out[:, k] = cpu_linear(x_padded[k], weight_padded[g], None if bias_padded is None else bias_padded[g])
        ctx.save_for_backward(x_padded, weight_padded)
        ctx.widths = (in_features, out_features)
        ctx.has_bias = bias is not None
        ctx.bias_in_gemm = bias_in_gemm
        return out[..., :out_features].transpose(0, 1)

    @staticmethod
    @_autocast_backward
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x_padded, weight_padded = ctx.saved_tensors
        in_features, out_features = ctx.widths
        num_sets = x_padded.shape[0]
        groups = weight_padded.shape[0]
        per_weight = num_sets // groups
        grad_padded = pad_last(grad, weight_padded.shape[1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # In the input's dtype (fp32 embeddings under autocast): the copy out of each GEMM casts.
            grad_x = torch.empty_like(x_padded, dtype=ctx.input_dtypes[0], memory_format=torch.contiguous_format)
            for k in range(num_sets):
                grad_x[k] = cpu_mm(grad_padded[k], weight_padded[k // per_weight])
            grad_x = grad_x[..., :in_features]
        bias_needed = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] or (bias_needed and ctx.bias_in_gemm):
            grad_padded_weight = torch.empty_like(weight_padded, memory_format=torch.contiguous_format)
            for k in range(num_sets):
                product = cpu_mm(grad_padded[k].t(), x_padded[k])
                if k % per_weight == 0:
                    grad_padded_weight[k // per_weight] = product
                else:
                    grad_padded_weight[k // per_weight] += product
            if ctx.needs_input_grad[1]:
                grad_weight = grad_padded_weight[:, :out_features, :in_features].contiguous()  # the parameter's layout
            if bias_needed and ctx.bias_in_gemm:
                grad_bias = grad_padded_weight[:, :out_features, in_features].contiguous()
        if bias_needed and not ctx.bias_in_gemm:
            grad_bias = grad.sum(dim=1).view(groups, per_weight, -1).sum(dim=1)
        return grad_x, grad_weight, grad_bias


def per_set_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """K set-specific linear layers on CPU: ``[K, B, in]`` x ``[G, out, in]`` (+ ``[G, out]``) -> ``[K, B, out]``, a
    view of batch-major storage (:class:`_SetLinearFunction`).

    Example::

        >>> x, weight, bias = torch.randn(3, 5, 7), torch.randn(3, 2, 7), torch.randn(3, 2)
        >>> torch.allclose(per_set_linear(x, weight, bias), torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)),
        ...                atol=1e-5)
        True
    """
    return _SetLinearFunction.apply(x, weight, bias)


# --------------------------------------------------------------------------------------------------------------------
# DCNv2's full-rank cross network


class _CrossNetFunction(torch.autograd.Function):
    r"""L full-rank cross layers on CPU: one GEMM per weight set at a padded width, the backward written out.

    The width D is zero-padded to a GEMM-friendly D' (:func:`gemm_width`). When there is padding (D' > D) the bias
    rides in it: :math:`x_0` and every :math:`x_l` carry a constant 1 in column D (:func:`pad_with_ones_column`) and
    the padded weight holds :math:`b_l` in column D (:func:`weights_with_bias_column`), so :math:`P_l = x_l W'^T_l`
    is the biased projection with no bias broadcast, and :math:`dW'_l = dP^T x_l` carries :math:`db_l = \sum dP` in
    its column D (no separate reduction over the batch). Row D of :math:`W'` is zero, so column D of every
    :math:`P_l` is 0 and that of :math:`x_{l+1} = x_0 \odot P_l + x_l` stays 1; the other padded columns stay 0.
    Without padding the bias is a separate ``addmm`` term and reduction.

    Forward per layer: :math:`P_l = x_l W_l^T + b_l` (one GEMM per weight set, :func:`cpu_linear`),
    :math:`x_{l+1} = x_0 \odot P_l + x_l`. Backward, from :math:`G = \partial L / \partial x_{l+1}`:
    :math:`dP = G \odot x_0`, the :math:`x_0` gradient accumulates :math:`G \odot P_l` in place,
    :math:`dW_l = dP^T x_l`, and :math:`\partial L / \partial x_l = G + dP\, W_l` is one GEMM accumulating into
    :math:`G` (the padded columns of :math:`G` pick up values there, which meet only zero rows of :math:`W'` and are
    sliced off): fewer element-wise passes a layer than autograd's addcmul / baddbmm backward. Saved tensors are
    those autograd would keep (each layer's input and projection), padded.
    """

    @staticmethod
    @_autocast_forward
    def forward(ctx, x0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        num_layers = len(params) // 2
        width = x0.shape[-1]
        padded = gemm_width(width)
        bias_in_gemm = padded > width
        if bias_in_gemm:
            weights = [
                weights_with_bias_column(w, b, padded, padded) for w, b in zip(params[:num_layers], params[num_layers:])
            ]
            biases: List[Optional[torch.Tensor]] = [None] * num_layers
            x0_padded = pad_with_ones_column(x0, padded)
        else:
            weights = list(params[:num_layers])
            biases = list(params[num_layers:])
            x0_padded = x0.contiguous()
        groups = x0.shape[0]
        inputs: List[torch.Tensor] = []
        projections: List[torch.Tensor] = []  # layer-major: layer l's set g at l * G + g
        xl = x0_padded
        for weight, bias in zip(weights, biases):
            following = torch.empty_like(x0_padded)
            for g in range(groups):
                projected = cpu_linear(xl[g], weight[g], None if bias is None else bias[g])
                torch.addcmul(xl[g], x0_padded[g], projected, out=following[g])
                projections.append(projected)
            inputs.append(xl)
            xl = following
        ctx.num_layers = num_layers
        ctx.width = width
        ctx.bias_in_gemm = bias_in_gemm
        ctx.save_for_backward(*weights, *inputs, *projections)
        return xl[..., :width]

    @staticmethod
    @_autocast_backward
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        n, width = ctx.num_layers, ctx.width
        saved = ctx.saved_tensors
        weights, inputs, projections = saved[:n], saved[n : 2 * n], saved[2 * n :]
        x0 = inputs[0]
        grad_weights: List[Optional[torch.Tensor]] = [None] * n
        grad_biases: List[Optional[torch.Tensor]] = [None] * n
        # dL/dx_l, updated in place layer by layer (a fresh padded copy: the incoming gradient is never modified).
        upstream = torch.empty_like(x0)
        upstream[..., :width] = grad
        upstream[..., width:] = 0.0
        # One buffer each for dP and the padded dW, reused by every layer (fewer large allocations per step).
        grad_projected = torch.empty_like(x0)
        grad_weight = torch.empty_like(weights[0])
        grad_x0: Optional[torch.Tensor] = None
        groups = x0.shape[0]
        for layer in reversed(range(n)):
            torch.mul(upstream, x0, out=grad_projected)
            first = grad_x0 is None
            if grad_x0 is None:
                grad_x0 = torch.empty_like(x0)
            for g in range(groups):
                if first:
                    torch.mul(upstream[g], projections[layer * groups + g], out=grad_x0[g])
                else:
                    grad_x0[g].addcmul_(upstream[g], projections[layer * groups + g])
            weight_needed = ctx.needs_input_grad[1 + layer]
            bias_needed = ctx.needs_input_grad[1 + n + layer]
            if weight_needed or (bias_needed and ctx.bias_in_gemm):
                for g in range(x0.shape[0]):
                    grad_weight[g] = cpu_mm(grad_projected[g].t(), inputs[layer][g])
            if weight_needed:
                # A copy out of the reused buffer, in the parameter's own (contiguous) layout: DDP's buckets and
                # AccumulateGrad would otherwise copy a strided gradient anyway, DDP with a warning.
                grad_weights[layer] = grad_weight[:, :width, :width].clone(memory_format=torch.contiguous_format)
            if bias_needed:
                if ctx.bias_in_gemm:
                    grad_biases[layer] = grad_weight[:, :width, width].clone(memory_format=torch.contiguous_format)
                else:
                    grad_biases[layer] = grad_projected.sum(dim=1)
            for g in range(x0.shape[0]):
                upstream[g] += cpu_mm(grad_projected[g], weights[layer][g])
        grad_input = upstream.add_(grad_x0)[..., :width] if ctx.needs_input_grad[0] else None
        return (grad_input, *grad_weights, *grad_biases)


def cross_network(x0: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]) -> torch.Tensor:
    r"""Full-rank cross layers :math:`x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l` on CPU (:class:`_CrossNetFunction`):
    ``[G, N, D]`` input, ``[G, D, D]`` weights and ``[G, D]`` biases per layer; the result is a ``[G, N, D]`` view of
    ``[G, N, D']`` storage.

    Example::

        >>> x = torch.randn(2, 8, 6)
        >>> weights, biases = [torch.randn(2, 6, 6)], [torch.zeros(2, 6)]
        >>> torch.allclose(cross_network(x, weights, biases), x * torch.bmm(x, weights[0].transpose(1, 2)) + x,
        ...                atol=1e-5)
        True
    """
    return _CrossNetFunction.apply(x0, *weights, *biases)


# --------------------------------------------------------------------------------------------------------------------
# Dropout masks from a counter-based random stream
#
# Written here rather than taken from torch: torch's CPU random draws (``uniform_``, ``bernoulli_``) run one mt19937
# on one thread, and a dropout mask was the largest element-wise item in the dense step's profile. SplitMix64
# (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014; the generator of Java's
# ``SplittableRandom``, which passes BigCrush) hashes a counter with a fixed mixing function, so a mask is a few
# vectorised integer passes that torch runs on every intra-op thread, and element ``i`` depends only on the seed and
# ``i``, never on the thread count. The passes run over cache-sized chunks: over a whole [2048, 1600] mask at once
# they took 1.4x as long (figures in ``benchmarks/README.md``).

_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_STEPS = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None))
# SplitMix64 outputs per chunk of a mask (512 KiB of int64, twice: the stream and its shifted copy).
MASK_CHUNK_OUTPUTS = 1 << 16


def _as_int64(value: int) -> int:
    """The int64 with the bits of the unsigned 64-bit ``value mod 2**64`` (torch's integer tensors are signed)."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _splitmix_mix_(stream: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """SplitMix64's mixing function in place on int64 counters; ``scratch`` is a same-sized buffer. The logical
    shift ``>>>`` is torch's arithmetic shift with the sign-extended bits masked off; int64 products wrap as unsigned
    ones do."""
    for shift, multiplier in _SPLITMIX_STEPS:
        torch.bitwise_right_shift(stream, shift, out=scratch).bitwise_and_((1 << (64 - shift)) - 1)
        stream.bitwise_xor_(scratch)
        if multiplier is not None:
            stream.mul_(_as_int64(multiplier))
    return stream


@functools.lru_cache(maxsize=None)
def _counter_steps() -> torch.Tensor:
    """``(i + 1) * gamma`` for ``i < MASK_CHUNK_OUTPUTS`` (mod 2**64): a chunk's counters are these plus an offset."""
    return torch.arange(1, MASK_CHUNK_OUTPUTS + 1, dtype=torch.int64).mul_(_as_int64(_SPLITMIX_GAMMA))


def splitmix64(count: int, seed: int) -> torch.Tensor:
    """``count`` outputs of the SplitMix64 stream started at ``seed``, as int64 with the outputs' bits.

    Output ``i`` mixes the counter ``seed + (i + 1) * 0x9E3779B97F4A7C15`` (mod 2**64): ``z ^= z >>> 30; z *=
    0xBF58476D1CE4E5B9; z ^= z >>> 27; z *= 0x94D049BB133111EB; z ^= z >>> 31``.

    Example::

        >>> [hex(int(v) % 2**64) for v in splitmix64(2, 0)]
        ['0xe220a8397b1dcdaf', '0x6e789e6aa1b965f4']
    """
    stream = torch.arange(1, count + 1, dtype=torch.int64).mul_(_as_int64(_SPLITMIX_GAMMA)).add_(_as_int64(seed))
    return _splitmix_mix_(stream, torch.empty_like(stream))


def _stream_base() -> int:
    """The seed of a new mask's stream, from torch's default generator (so ``torch.manual_seed`` governs masks)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def keep_threshold(p: float) -> int:
    """The signed 32-bit word at or above which :func:`keep_mask` keeps an element: ``round(p * 2**32) - 2**31``
    (the words are uniform on ``[-2**31, 2**31)``, so the keep probability is ``1 - p`` to within ``2**-33``)."""
    return round(p * 2**32) - 2**31


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask shaped like ``x``: True (kept) with probability ``1 - p``, each element independently.

    On CPU, element ``i`` is kept when the ``i``-th 32-bit word of the :func:`splitmix64` stream (two per output,
    the low half first on this little-endian layout), read as a signed integer (uniform on ``[-2**31, 2**31)``), is
    at least ``round(p * 2**32) - 2**31``: the keep probability is ``1 - p`` to within ``2**-33`` (a float32
    uniform compared with ``p``, torch's way, resolves ``2**-24``). The words are computed
    :data:`MASK_CHUNK_OUTPUTS` outputs at a time, each chunk's passes on every intra-op thread. The stream's seed is
    drawn from torch's default generator; the mask depends on that seed only, not on the thread count. Other
    devices use ``torch.rand_like(x) >= p``.

    Example::

        >>> torch.manual_seed(0) and None
        >>> mask = keep_mask(torch.empty(1000, 1000), 0.2)
        >>> mask.dtype, mask.shape, 0.79 < float(mask.float().mean()) < 0.81
        (torch.bool, torch.Size([1000, 1000]), True)
    """
    if x.device.type != "cpu":
        return torch.rand_like(x, memory_format=torch.contiguous_format) >= p
    count = x.numel()
    outputs = (count + 1) // 2
    seed = _stream_base()
    threshold = keep_threshold(p)
    mask = torch.empty(2 * outputs, dtype=torch.bool)
    size = min(MASK_CHUNK_OUTPUTS, outputs)
    stream, scratch = torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64)
    steps = _counter_steps()
    for start in range(0, outputs, MASK_CHUNK_OUTPUTS):
        n = min(MASK_CHUNK_OUTPUTS, outputs - start)
        # Counters seed + (start + j + 1) * gamma, j < n.
        torch.add(steps[:n], _as_int64(seed + start * _SPLITMIX_GAMMA), out=stream[:n])
        words = _splitmix_mix_(stream[:n], scratch[:n]).view(torch.int32)
        torch.ge(words, threshold, out=mask[2 * start : 2 * (start + n)])
    return mask[:count].view(x.shape)


def mask_factors(keep: torch.Tensor) -> torch.Tensor:
    """The factors a dropout multiplies by: a bool mask as its 0/1 bytes (a uint8 view, no copy); a mask of another
    dtype (0/1 values already, e.g. a benchmark's contender) as it is.

    The same factors as the bool mask; torch converts uint8 to a floating type with vectorised loops, bool
    element by element, so a product with the uint8 view is the faster one (float32 and bfloat16 alike).

    Example::

        >>> mask_factors(torch.tensor([True, False])).tolist(), mask_factors(torch.tensor([1.0, 0.0])).tolist()
        ([1, 0], [1.0, 0.0])
    """
    return keep.view(torch.uint8) if keep.dtype == torch.bool else keep


def dropout_scale(p: float) -> float:
    """``1 / (1 - p)``, the factor of the kept elements (as ``nn.Dropout``)."""
    return 1.0 / (1.0 - p)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout in training: ``x / (1 - p)`` where :func:`keep_mask` keeps, else 0. The distribution is
    ``nn.Dropout``'s; the random stream differs.

    Example::

        >>> out = dropout(torch.ones(100_000), 0.2)
        >>> sorted(set(out.tolist())), 0.79 < float((out > 0).float().mean()) < 0.81
        ([0.0, 1.25], True)
    """
    return torch.mul(x, mask_factors(keep_mask(x, p))).mul_(dropout_scale(p))


class _ReLUDropoutFunction(torch.autograd.Function):
    r"""``relu(x) * keep`` (``keep`` as :func:`dropout`), with one saved tensor: the output.

    Forward is exactly ``torch.relu`` followed by the dropout multiply. Backward uses that an output element is
    positive exactly where ``x > 0`` and the element was kept (``1 / (1 - p) > 1`` never rounds a positive product
    to 0), so :math:`\partial L / \partial x = \text{threshold\_backward}(g, \text{out}, 0) / (1 - p)`: the
    values autograd computes through ReLU and dropout (``g * keep`` masked where ``x <= 0``), without keeping the
    mask alive until backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        out = torch.relu(x).mul_(mask_factors(keep_mask(x, p))).mul_(dropout_scale(p))
        ctx.save_for_backward(out)
        ctx.scale = dropout_scale(p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0.0).mul_(ctx.scale), None


def relu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(relu(x))`` in training, in one autograd node (:class:`_ReLUDropoutFunction`).

    Example::

        >>> x = torch.randn(100_000)
        >>> out = relu_dropout(x, 0.2)
        >>> bool(((out == 0) | (out == 1.25 * x)).all()), bool((out[x <= 0] == 0).all())
        (True, True)
    """
    return _ReLUDropoutFunction.apply(x, p)
