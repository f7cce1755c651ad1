"""Batched set arches == a straightforward per-set loop (the paper's code structure), forward and gradients.

The references below are written from the paper's code (``thuml/Multi-Embedding``, ``torchfm``): one set at a
time, plain matmuls, the paper's own formulations (e.g. the element-pair products for IPNN, ``Conv1d`` for the CIN,
the ``[B, E, F, F]`` outer product for NFwFM), reading the batched modules' weights by slicing set ``k``'s block.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

from multiembed.models import (
    BACKBONES,
    BatchedLinear,
    SetBatchNorm,
    SetInteractionArch,
    SetProjection,
    build_model,
    build_set_arch,
    parse_model_name,
)

B, NUM_FIELDS, HIDDEN = 16, 5, 8


def group_of(module, k: int) -> int:
    """The weight index set ``k`` uses in a module with ``num_sets`` sets and ``num_weight_sets`` weights."""
    return k // (module.num_sets // module.num_weight_sets)


def ref_linear(linear: BatchedLinear, k: int, x: torch.Tensor) -> torch.Tensor:
    g = group_of(linear, k)
    return x @ linear.weight[g].T + linear.bias[g]


def ref_norm(norm: SetBatchNorm, k: int, h: torch.Tensor) -> torch.Tensor:
    width = norm.num_features
    if norm.weight is None:
        weight = norm.batch_norm.weight[k * width : (k + 1) * width]
        bias = norm.batch_norm.bias[k * width : (k + 1) * width]
    else:
        weight, bias = norm.weight[group_of(norm, k), 0], norm.bias[group_of(norm, k), 0]
    return F.batch_norm(h, None, None, weight, bias, training=True, eps=norm.batch_norm.eps)


def ref_projection(projection: SetProjection, k: int, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(ref_norm(projection.norm, k, ref_linear(projection.linear, k, x)))


def ref_dnn(arch, k, e):
    return ref_projection(arch.projection, k, e.flatten(1))


def ref_cross(arch, k, e):
    cross = arch.crossnet
    g = group_of(cross, k)
    x0 = e.flatten(1)
    x = x0
    for layer in range(cross.num_layers):
        if hasattr(cross, "low_rank"):
            w = cross.W_kernels[layer][g] @ cross.V_kernels[layer][g]
        else:
            w = cross.weights[layer][g]
        x = x0 * (torch.matmul(w, x.unsqueeze(2)).squeeze(2) + cross.biases[layer][g]) + x
    return ref_projection(arch.projection, k, x)


def pair_products(e: torch.Tensor) -> torch.Tensor:
    rows, cols = zip(*[(i, j) for i in range(e.shape[1] - 1) for j in range(i + 1, e.shape[1])])
    return torch.sum(e[:, list(rows)] * e[:, list(cols)], dim=2)


def ref_ipnn(arch, k, e):
    products = pair_products(e)
    if arch.prepend == "embeddings":
        products = torch.cat([e.flatten(1), products], dim=1)
    return ref_projection(arch.projection, k, products)


def ref_ffm(arch, k, e):
    """Field i's block for j is j (j < i) or j - 1 (j > i), of width d // (F - 1)."""
    f, s = e.shape[1], arch.products.sub_dim

    def block(i: int, j: int) -> torch.Tensor:
        b = j if j < i else j - 1
        return e[:, i, b * s : (b + 1) * s]

    products = torch.stack([(block(i, j) * block(j, i)).sum(-1) for i in range(f) for j in range(i + 1, f)], dim=1)
    return ref_projection(arch.projection, k, products)


def ref_dlrm(arch, k, e):
    products = pair_products(e)
    if arch.prepend == "dense_field":
        products = torch.cat([e[:, -1], products], dim=1)
    return ref_projection(arch.projection, k, products)


def ref_nfwfm(arch, k, e):
    weight = arch.fwfm.weight[group_of(arch.fwfm, k)]
    inputs_a = e.transpose(1, 2).unsqueeze(-1)  # B x E x F x 1
    inputs_b = e.transpose(1, 2).unsqueeze(-2)  # B x E x 1 x F
    fwfm = (torch.matmul(inputs_a, inputs_b) * weight).sum(dim=-1).sum(dim=-1)  # B x E
    return ref_projection(arch.projection, k, ref_norm(arch.norm, k, fwfm))


def ref_xdeepfm(arch, k, e):
    cin = arch.cin
    g = group_of(cin, k)
    x0, h = e.unsqueeze(2), e
    pooled = []
    for weight, bias in zip(cin.weights, cin.biases):
        z = x0 * h.unsqueeze(1)
        z = z.view(z.shape[0], z.shape[1] * z.shape[2], z.shape[3])
        h = torch.relu(F.conv1d(z, weight[g].unsqueeze(-1), bias[g]))
        pooled.append(h)
    cin_features = torch.sum(torch.cat(pooled, dim=1), 2)
    return torch.cat([cin_features, ref_projection(arch.projection, k, e.flatten(1))], dim=1)


def ref_finalmlp(arch, k, e):
    streams = arch.streams
    sets = streams.num_sets
    width = streams.layer_sizes[0]
    first = streams.first
    g = group_of(first.linear, k)
    outputs = []
    for stream in range(2):
        rows = slice(stream * width, (stream + 1) * width)
        h = e.flatten(1) @ first.linear.weight[g][rows].T + first.linear.bias[g][rows]
        full = 2 * width
        if first.norm.weight is None:
            bn_w = first.norm.batch_norm.weight[k * full : (k + 1) * full][rows]
            bn_b = first.norm.batch_norm.bias[k * full : (k + 1) * full][rows]
        else:
            bn_w, bn_b = first.norm.weight[g, 0][rows], first.norm.bias[g, 0][rows]
        h = torch.relu(F.batch_norm(h, None, None, bn_w, bn_b, training=True))
        for layer in streams.rest:
            h = ref_projection(layer, stream * sets + k, h)  # virtual set of (stream, set), stream-major
        outputs.append(h)
    return torch.cat(outputs, dim=1)


REFERENCES: Dict[str, Callable] = {
    "dnn": ref_dnn,
    "dcnv2": ref_cross,
    "dcnv2lr": ref_cross,
    "ipnn": ref_ipnn,
    "nfwfm": ref_nfwfm,
    "xdeepfm": ref_xdeepfm,
    "finalmlp": ref_finalmlp,
    "dlrm": ref_dlrm,
    "ffm": ref_ffm,
}
SMALL = {"dcnv2lr": {"cross_rank": 3}, "xdeepfm": {"cin_layer_sizes": (3, 2)}, "finalmlp": {"stream_layer_sizes": (6, 5)}}


def per_set_loop(arch: SetInteractionArch, backbone: str, embeddings: torch.Tensor) -> torch.Tensor:
    return torch.stack([REFERENCES[backbone](arch, k, embeddings[:, k]) for k in range(arch.num_sets)], dim=1)


def compare(arch: SetInteractionArch, backbone: str, embeddings: torch.Tensor) -> None:
    arch.train()
    params = [p for p in arch.parameters()]
    leaf = embeddings.detach().requires_grad_(True)
    batched = arch(leaf)
    reference = per_set_loop(arch, backbone, leaf)
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-5)
    probe = torch.randn_like(reference)
    grads = torch.autograd.grad((batched * probe).sum(), [leaf] + params, allow_unused=True)
    ref_grads = torch.autograd.grad((reference * probe).sum(), [leaf] + params, allow_unused=True)
    names = ["embeddings"] + [n for n, _ in arch.named_parameters()]
    for name, got, expected in zip(names, grads, ref_grads):
        assert got is not None and expected is not None, name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def set_major_embeddings(num_sets: int, num_fields: int, set_dim: int) -> torch.Tensor:
    """``[B, K, F, d]`` with set-major storage, as the sparse arch returns it."""
    return torch.randn(num_sets, B, num_fields, set_dim).transpose(0, 1)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode, scale", [("me", 3), ("mesi", 2), ("se", 2)])
def test_batched_set_arch_equals_per_set_loop(backbone: str, mode: str, scale: int) -> None:
    torch.manual_seed(10 * BACKBONES.index(backbone) + scale)
    spec = parse_model_name(f"{backbone}-{mode}-{scale}x4")
    arch = build_set_arch(spec, NUM_FIELDS, hidden=HIDDEN, dropout=0.0, **SMALL.get(backbone, {}))
    # Biases and BatchNorm affine start at 0/1: perturb them so every parameter is checked with non-trivial values.
    with torch.no_grad():
        for p in arch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compare(arch, backbone, set_major_embeddings(spec.num_sets, NUM_FIELDS, spec.set_dim))


@pytest.mark.parametrize("backbone", ["dlrm", "ipnn", "dcnv2"])
def test_batched_set_arch_with_dense_field_equals_per_set_loop(backbone: str) -> None:
    torch.manual_seed(3)
    spec = parse_model_name(f"{backbone}-me-2x4")
    arch = build_set_arch(spec, NUM_FIELDS + 1, hidden=HIDDEN, dropout=0.0, dense_field=True)
    compare(arch, backbone, set_major_embeddings(2, NUM_FIELDS + 1, 4))


def test_batched_set_arch_accepts_batch_major_storage() -> None:
    torch.manual_seed(4)
    arch = build_set_arch(parse_model_name("dcnv2-me-3x4"), NUM_FIELDS, hidden=HIDDEN, dropout=0.0)
    set_major = set_major_embeddings(3, NUM_FIELDS, 4)
    torch.testing.assert_close(arch(set_major.contiguous()), arch(set_major))


def test_mesi_shares_one_branch_and_me_does_not() -> None:
    torch.manual_seed(5)
    shared = build_set_arch(parse_model_name("dcnv2-mesi-3x4"), NUM_FIELDS, hidden=HIDDEN, dropout=0.0)
    own = build_set_arch(parse_model_name("dcnv2-me-3x4"), NUM_FIELDS, hidden=HIDDEN, dropout=0.0)
    # The same input in every set gives the same output in every set iff the branch is shared.
    one_set = torch.randn(B, 1, NUM_FIELDS, 4).expand(B, 3, NUM_FIELDS, 4)
    out_shared, out_own = shared(one_set), own(one_set)
    torch.testing.assert_close(out_shared[:, 0], out_shared[:, 2])
    assert not torch.allclose(out_own[:, 0], out_own[:, 2])
    assert shared.crossnet.weights[0].shape[0] == 1 and own.crossnet.weights[0].shape[0] == 3


def _copy_state(source: torch.nn.Module, target: torch.nn.Module) -> None:
    target.load_state_dict(source.state_dict(), strict=True)


def _tiny_batch(vocab: Dict[str, int], generator: torch.Generator):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = list(vocab)
    lengths = torch.randint(0, 3, (len(keys) * B,), generator=generator)
    values: List[torch.Tensor] = []
    for i, key in enumerate(keys):
        count = int(lengths[i * B : (i + 1) * B].sum())
        values.append(torch.randint(0, vocab[key], (count,), generator=generator))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=lengths)


@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "ipnn"])
def test_me_with_one_set_is_se(backbone: str) -> None:
    """Where the paper's SE and ME forms coincide at K = 1, ``me-1x`` is ``se-1x``: same parameters, same logits."""
    torch.manual_seed(6)
    vocab = {f"f{i}": 7 + i for i in range(NUM_FIELDS)}
    cpu = torch.device("cpu")
    se = build_model(f"{backbone}-se-1x", vocab, device=cpu, hidden=HIDDEN, **SMALL.get(backbone, {}))
    me = build_model(f"{backbone}-me-1x", vocab, device=cpu, hidden=HIDDEN, **SMALL.get(backbone, {}))
    _copy_state(se, me)
    se.eval(), me.eval()
    features = _tiny_batch(vocab, torch.Generator().manual_seed(0))
    torch.testing.assert_close(me(torch.empty(B, 0), features), se(torch.empty(B, 0), features))


def test_ipnn_me_with_one_set_differs_from_se() -> None:
    """The paper's IPNN ME branch drops the embeddings from the MLP input; SE keeps them."""
    spec_se, spec_me = parse_model_name("ipnn-se-1x"), parse_model_name("ipnn-me-1x")
    se = build_set_arch(spec_se, NUM_FIELDS, hidden=HIDDEN)
    me = build_set_arch(spec_me, NUM_FIELDS, hidden=HIDDEN)
    pairs = NUM_FIELDS * (NUM_FIELDS - 1) // 2
    assert se.projection.in_features == pairs + NUM_FIELDS * spec_se.set_dim
    assert me.projection.in_features == pairs
