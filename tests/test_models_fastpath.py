"""The CPU fast path of the cross set arch as a whole (bias carried in the padded GEMM column, the projection
reading the cross network's padded output in place, ReLU + dropout in one node) against plain autograd in float64:
the same outputs and the same gradients for the embeddings and every parameter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from multiembed.models import build_set_arch, parse_model_name
from multiembed.models.layers import ReLUDropout, cpu_linear, ones_column_padded_base, pad_with_ones_column


def reference_forward(arch, embeddings: torch.Tensor) -> torch.Tensor:
    """The cross set arch written with plain batched ops (autograd does the backward)."""
    cross, projection = arch.crossnet, arch.projection
    k = arch.num_sets
    x0 = embeddings.transpose(0, 1).flatten(2)  # [K, B, D]
    x = x0
    for weight, bias in zip(cross.weights, cross.biases):
        per = k // weight.shape[0]
        w, b = weight.repeat_interleave(per, 0), bias.repeat_interleave(per, 0)
        x = x0 * (torch.bmm(x, w.transpose(1, 2)) + b.unsqueeze(1)) + x
    linear = projection.linear
    per = k // linear.weight.shape[0]
    hidden = torch.bmm(x, linear.weight.repeat_interleave(per, 0).transpose(1, 2))
    hidden = hidden + linear.bias.repeat_interleave(per, 0).unsqueeze(1)  # [K, B, H]
    batch, width = hidden.shape[1], hidden.shape[2]
    norm = projection.norm
    flat = hidden.transpose(0, 1).reshape(batch, k * width)
    if norm.weight is None:
        normed = F.batch_norm(flat, None, None, norm.batch_norm.weight, norm.batch_norm.bias, True, 0.0,
                              norm.batch_norm.eps).view(batch, k, width)
    else:
        grouped = F.batch_norm(flat, None, None, None, None, True, 0.0, norm.batch_norm.eps)
        groups = norm.weight.shape[0]
        normed = (grouped.view(batch, groups, k // groups, width) * norm.weight + norm.bias).view(batch, k, width)
    return torch.relu(normed)


@pytest.mark.parametrize("name, fields", [("dcnv2-me-3x", 5), ("dcnv2-mesi-4x", 5), ("dcnv2-me-2x", 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_set_arch_fast_path_matches_plain_autograd(name: str, fields: int, dtype: torch.dtype) -> None:
    """float64 checks the maths tightly (torch's GEMMs); float32 runs the fast path's oneDNN GEMMs, against the
    float64 reference."""
    torch.manual_seed(0)
    reference_arch = build_set_arch(parse_model_name(name), num_fields=fields, hidden=6).double()
    for module in reference_arch.modules():
        if isinstance(module, ReLUDropout):
            module.p = 0.0  # deterministic; the dropout itself is tested in test_models_dropout.py
    with torch.no_grad():  # non-trivial biases and affine parameters
        for param in reference_arch.parameters():
            if param.dim() <= 2 or param.shape[-2] == 1:
                param.uniform_(-0.5, 0.5)
    arch = copy.deepcopy(reference_arch).to(dtype)
    embeddings = torch.randn(16, arch.num_sets, fields, arch.set_dim, dtype=torch.float64)
    upstream = torch.randn(16, arch.num_sets, arch.output_dim, dtype=torch.float64)

    leaf = embeddings.to(dtype).requires_grad_(True)
    out = arch(leaf)
    grads = torch.autograd.grad(out, [leaf, *arch.parameters()], upstream.to(dtype))
    reference_leaf = embeddings.clone().requires_grad_(True)
    expected = reference_forward(reference_arch, reference_leaf)
    expected_grads = torch.autograd.grad(expected, [reference_leaf, *reference_arch.parameters()], upstream)

    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out.double(), expected, **tolerance)
    names = ["embeddings", *(n for n, _ in arch.named_parameters())]
    for label, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got.double(), want, **tolerance, msg=lambda m, label=label: f"{label}: {m}")


def test_cpu_linear_matches_float64_matmul() -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(300, 392), torch.randn(392, 392) / 20, torch.randn(392)
    expected = x.double() @ weight.double().t() + bias.double()
    torch.testing.assert_close(cpu_linear(x, weight, bias).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_linear(x, weight).double(), expected - bias.double(), rtol=1e-5, atol=1e-5)
    assert cpu_linear(x.double(), weight.double()).dtype == torch.float64


def test_padded_base_is_found_only_when_the_padding_holds_ones_then_zeros() -> None:
    x = torch.randn(3, 4, 5)
    padded = pad_with_ones_column(x, 8)
    assert torch.equal(padded[..., :5], x) and bool((padded[..., 5] == 1).all()) and bool((padded[..., 6:] == 0).all())
    base = ones_column_padded_base(padded[..., :5], 8)
    assert base is not None and base.data_ptr() == padded.data_ptr() and torch.equal(base, padded)
    padded[1, 2, 7] = 0.5  # a stray value in the padding: the storage must not be used
    assert ones_column_padded_base(padded[..., :5], 8) is None
    assert ones_column_padded_base(x, 8) is None  # contiguous, no padding around it
    assert ones_column_padded_base(padded[..., :4], 8) is None  # column 4 is data, not the ones column
