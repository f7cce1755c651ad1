"""The CPU fast path (``multiembed.models.cpu_fastpath``) against the plain batched reference path (the path GPUs
run): every backbone in SE, ME and shared-interaction form, forward and backward with the switch on and off on the
same weights and batch, in float64 and float32; the switch itself (it really changes the path, also in a traced
model, and follows ``MULTIEMBED_FAST_PATH``); under bf16 autocast (``--precision bf16``, on CPUs with native bf16)
the fast path against the bf16 reference path in the same way; the per-machine GEMM choice and its probe; the padding
helpers; and the cross set arch against a hand-written autograd reference."""

from __future__ import annotations

import copy
import doctest
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multiembed.models import BACKBONES, build_model, build_set_arch, parse_model_name
from multiembed.models import cpu_fastpath
from multiembed.models.cpu_fastpath import cpu_linear, ones_column_padded_base, pad_with_ones_column
from multiembed.models.layers import ReLUDropout
from multiembed.models.precision import cpu_bf16_supported

FAST_FUNCTIONS = ("per_set_linear", "cross_network", "dropout", "relu_dropout")
BATCH = 16
# Small options for every backbone (the defaults are the paper's sizes).
SMALL_OPTIONS: Dict[str, Dict[str, object]] = {
    "dnn": {},
    "dcnv2": {"cross_layers": 2},
    "dcnv2lr": {"cross_layers": 2, "cross_rank": 3},
    "ipnn": {},
    "nfwfm": {},
    "xdeepfm": {"cin_layer_sizes": (3, 4)},
    "finalmlp": {"stream_layer_sizes": (12, 8)},
    "dlrm": {"dense_arch_layer_sizes": (8,)},
    "ffm": {},
}
# (name suffix, fields, hidden): padded widths (3 fields x 5 = 15 -> 16, hidden 12 -> 16), shared interaction
# (mesi), and widths that are multiples of 8 already (4 fields x 4 = 16, hidden 16: no padding, bias outside the GEMM).
FORMS: List[Tuple[str, int, int]] = [("se-2x5", 3, 12), ("me-2x5", 3, 12), ("mesi-3x4", 3, 12), ("me-2x4", 4, 16)]


class FixedEmbeddings(nn.Module):
    """Stands in for the sparse arch: returns the ``[B, K, F, d]`` tensor it holds (a leaf that gets a gradient), so
    the model runs in float64 too (FBGEMM's tables are float32) and the embedding gradient can be compared."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Optional[torch.Tensor] = None

    def forward(self, _features: object) -> torch.Tensor:
        assert self.value is not None
        return self.value


@pytest.fixture()
def fast_calls(monkeypatch) -> Iterator[Dict[str, int]]:
    """Counts the calls of the fast path's entry points (they still run)."""
    calls = {name: 0 for name in FAST_FUNCTIONS}
    for name in FAST_FUNCTIONS:
        original = getattr(cpu_fastpath, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cpu_fastpath, name, counted)
    yield calls


def small_model(name: str, fields: int, hidden: int, dropout: float, dtype: torch.dtype) -> nn.Module:
    spec = parse_model_name(name)
    vocab = {f"f{i}": 5 + i for i in range(fields - (1 if spec.backbone == "dlrm" else 0))}
    num_dense = 2 if spec.backbone == "dlrm" else 0
    model = build_model(name, vocab, num_dense, device=torch.device("cpu"), hidden=hidden, dropout=dropout,
                        **SMALL_OPTIONS[spec.backbone])
    model.sparse_arch = FixedEmbeddings()
    with torch.no_grad():  # non-trivial biases, affine parameters and running statistics
        for param in model.parameters():
            if param.dim() <= 2 or param.shape[-2] == 1:
                param.uniform_(-0.5, 0.5)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.uniform_(-0.5, 0.5)
            elif buffer_name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model.to(dtype)


def run(model: nn.Module, embeddings: torch.Tensor, dense: torch.Tensor, upstream: torch.Tensor,
        fast: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    leaf = embeddings.clone().requires_grad_(True)
    model.sparse_arch.value = leaf
    params = [p for p in model.parameters()]
    with cpu_fastpath.use_fast_path(fast):
        logits = model(dense, None)
        grads = torch.autograd.grad(logits, [leaf, *params], upstream)
    return logits.detach(), list(grads)


def compare(model: nn.Module, dtype: torch.dtype, fast_calls: Dict[str, int]) -> None:
    num_sets, fields, set_dim = model.set_arch.num_sets, model.set_arch.num_fields, model.set_arch.set_dim
    stored_fields = fields - (1 if model.dense_arch is not None else 0)
    embeddings = torch.randn(BATCH, num_sets, stored_fields, set_dim, dtype=dtype)
    dense = torch.randn(BATCH, 2 if model.dense_arch is not None else 0, dtype=dtype)
    upstream = torch.randn(BATCH, dtype=dtype)
    plain = copy.deepcopy(model)

    before = dict(fast_calls)
    fast_out, fast_grads = run(model, embeddings, dense, upstream, fast=True)
    assert fast_calls["per_set_linear"] > before["per_set_linear"], "the fast path was not taken"
    before = dict(fast_calls)
    plain_out, plain_grads = run(plain, embeddings, dense, upstream, fast=False)
    assert fast_calls == before, "the plain path called the fast path"

    tolerance = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(fast_out, plain_out, **tolerance)
    names = ["embeddings", *(n for n, _ in model.named_parameters())]
    assert len(names) == len(fast_grads) == len(plain_grads)
    for label, got, want in zip(names, fast_grads, plain_grads):
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m, label=label: f"{label}: {m}")
    for (label, got), (_, want) in zip(model.named_buffers(), plain.named_buffers()):  # BatchNorm statistics
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m, label=label: f"{label}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("form, fields, hidden", FORMS, ids=[f[0] for f in FORMS])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_fast_path_matches_the_plain_path(backbone: str, form: str, fields: int, hidden: int,
                                                         dtype: torch.dtype, fast_calls) -> None:
    """Train mode (batch statistics; dropout 0, so both paths draw no mask) and eval mode (running statistics;
    dropout 0.2 is the identity there): outputs, the embedding gradient, every parameter gradient and the BatchNorm
    running statistics. The dropout masks themselves differ by design (another random stream) and are tested
    separately in ``test_models_dropout.py``, on both paths."""
    torch.manual_seed(0)
    name = f"{backbone}-{form}"
    compare(small_model(name, fields, hidden, 0.0, dtype).train(), dtype, fast_calls)
    compare(small_model(name, fields, hidden, 0.2, dtype).eval(), dtype, fast_calls)


# bf16 keeps 8 significant bits (relative rounding 2^-9). The bf16 fast path and the bf16 reference path round at
# different points (per-set GEMMs against batched ones; the cross layers' running sum x_l is bf16 on the fast path,
# fp32 on the reference path, where autocast's addcmul promotes), so each tensor is compared by its norm: measured
# at most 1.0% apart for the logits, 3.7% for the gradients (with the floor below) and 0.1% for BatchNorm's running
# statistics over these backbones and forms. A gradient that is exactly 0 in exact arithmetic (a bias right before
# train-mode BatchNorm) is rounding noise on both paths (measured up to 0.5% of the largest gradient), so its error
# is judged against 20% of the largest gradient instead of its own norm.
BF16_PATHS_RTOL = 0.05
BF16_GRAD_FLOOR = 0.2
# The fast path's custom autograd Functions: the nodes whose presence in the graph shows the fast path ran.
FAST_NODES = ("_SetLinearFunctionBackward", "_CrossNetFunctionBackward", "_LinearFunctionBackward",
              "_ReLUDropoutFunctionBackward")

needs_native_bf16 = pytest.mark.skipif(not cpu_bf16_supported(),
                                       reason="this CPU has no native bf16: --precision bf16 is refused on it")


def graph_node_names(output: torch.Tensor) -> set:
    """The class names of every autograd node ``output`` depends on."""
    names, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(following for following, _ in node.next_functions)
    return names


def norm_error(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """``|got - want| / max(|want|, floor)`` in float64 (Frobenius norms)."""
    return float((got.double() - want.double()).norm()) / max(float(want.double().norm()), floor, 1e-30)


def compare_bf16(model: nn.Module) -> None:
    """``model`` (fp32 parameters, ``precision="bf16"``) on the fast path against a copy on the reference path."""
    num_sets, fields, set_dim = model.set_arch.num_sets, model.set_arch.num_fields, model.set_arch.set_dim
    stored_fields = fields - (1 if model.dense_arch is not None else 0)
    embeddings = torch.randn(BATCH, num_sets, stored_fields, set_dim)
    dense = torch.randn(BATCH, 2 if model.dense_arch is not None else 0)
    upstream = torch.randn(BATCH)
    plain = copy.deepcopy(model)

    leaf = embeddings.clone().requires_grad_(True)
    model.sparse_arch.value = leaf
    with cpu_fastpath.use_fast_path(True):
        fast_out = model(dense, None)
        nodes = graph_node_names(fast_out)
        fast_grads = torch.autograd.grad(fast_out, [leaf, *model.parameters()], upstream)
    assert "_SetLinearFunctionBackward" in nodes, f"the fast path was not taken under bf16 autocast: {nodes}"
    plain_out, plain_grads = run(plain, embeddings, dense, upstream, fast=False)

    assert fast_out.dtype == plain_out.dtype == torch.float32  # the logits come back fp32 for the loss
    assert norm_error(fast_out.detach(), plain_out) < BF16_PATHS_RTOL
    names = ["embeddings", *(n for n, _ in model.named_parameters())]
    largest = max(float(g.norm()) for g in plain_grads)
    for label, got, want, param in zip(names, fast_grads, plain_grads, [leaf, *model.parameters()]):
        assert got.dtype == param.dtype == torch.float32, label  # gradients of fp32 leaves come back fp32
        assert norm_error(got, want, BF16_GRAD_FLOOR * largest) < BF16_PATHS_RTOL, label
    for (label, got), (_, want) in zip(model.named_buffers(), plain.named_buffers()):  # BatchNorm statistics
        assert got.dtype == want.dtype, label  # fp32 running averages (num_batches_tracked: int64)
        if got.is_floating_point():
            assert got.dtype == torch.float32 and norm_error(got, want) < BF16_PATHS_RTOL, label


@needs_native_bf16
@pytest.mark.parametrize("form, fields, hidden", FORMS, ids=[f[0] for f in FORMS])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_bf16_fast_path_matches_the_bf16_reference_path(backbone: str, form: str, fields: int,
                                                                       hidden: int) -> None:
    """``--precision bf16`` (the dense arches under CPU bf16 autocast, fp32 parameters): the fast path's Functions
    run (their nodes are in the graph) and match the bf16 reference path within :data:`BF16_PATHS_RTOL`, in train
    mode (batch statistics, dropout 0) and eval mode (running statistics, dropout the identity); every gradient of
    an fp32 leaf comes back fp32 and the BatchNorm running statistics stay fp32."""
    torch.manual_seed(0)
    name = f"{backbone}-{form}"
    for dropout, train in ((0.0, True), (0.2, False)):
        model = small_model(name, fields, hidden, dropout, torch.float32).train(train)
        model.precision = "bf16"
        compare_bf16(model)


@needs_native_bf16
def test_bf16_fast_path_runs_every_function_in_bf16(fast_calls) -> None:
    """With dropout in training, every fast entry point runs under bf16 autocast and every custom Function is in
    the graph; the activations between them are bf16 (the set arch's output), the parameters' gradients fp32."""
    torch.manual_seed(0)
    model = small_model("dcnv2-me-2x5", 3, 16, 0.3, torch.float32).train()
    model.precision = "bf16"
    model.sparse_arch.value = torch.randn(BATCH, 2, 3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_set = model.set_arch(model.sparse_arch.value)
    assert per_set.dtype == torch.bfloat16
    logits = model(torch.empty(BATCH, 0), None)
    assert set(FAST_NODES) <= graph_node_names(logits)
    assert {name for name, count in fast_calls.items() if count} == set(FAST_FUNCTIONS)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_switch_under_autocast(monkeypatch) -> None:
    """Under CPU autocast the fast path runs for bf16 autocast on a CPU with native bf16 and fp32 or bf16 input
    only; float16 autocast, float64 input and a CPU without native bf16 keep the reference path. Outside autocast
    a bf16 tensor keeps the reference path."""
    x = torch.ones(3)
    with cpu_fastpath.use_fast_path(True):
        assert not cpu_fastpath.enabled(x.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.float16):
            assert not cpu_fastpath.enabled(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_fastpath.enabled(x.double()) and not cpu_fastpath.enabled(x.to("meta"))
            assert cpu_fastpath.enabled(x) is cpu_fastpath.enabled(x.to(torch.bfloat16)) is cpu_bf16_supported()
            monkeypatch.setattr(cpu_fastpath, "_native_bf16", lambda: False)
            assert not cpu_fastpath.enabled(x) and not cpu_fastpath.enabled(x.to(torch.bfloat16))
            monkeypatch.setattr(cpu_fastpath, "_native_bf16", lambda: True)
            with cpu_fastpath.use_fast_path(False):
                assert not cpu_fastpath.enabled(x)


def test_the_switch_changes_the_path_also_in_a_traced_model(fast_calls) -> None:
    """With dropout > 0 in training every fast entry point runs when the switch is on, none when it is off; an
    fx-traced set arch (TorchRec's pipeline traces the model) reads the switch at run time as the eager model does."""
    torch.manual_seed(0)
    model = small_model("dcnv2-me-2x5", 3, 12, 0.3, torch.float32).train()
    model.sparse_arch.value = torch.randn(BATCH, 2, 3, 5, requires_grad=True)
    traced_set_arch = torch.fx.symbolic_trace(model.set_arch)
    wrapped = {node.target.__name__ for node in traced_set_arch.graph.nodes if node.op == "call_function"}
    assert {"per_set_linear", "cross_network", "relu_dropout"} <= wrapped

    def eager() -> None:
        model(torch.empty(BATCH, 0), None).sum().backward()

    def traced() -> None:
        traced_set_arch(model.sparse_arch.value).sum().backward()

    expected = {"eager": set(FAST_FUNCTIONS), "traced": {"per_set_linear", "cross_network", "relu_dropout"}}
    for label, runner in (("eager", eager), ("traced", traced)):
        for fast in (True, False):
            for name in fast_calls:
                fast_calls[name] = 0
            with cpu_fastpath.use_fast_path(fast):
                runner()
            called = {name for name, count in fast_calls.items() if count}
            assert called == (expected[label] if fast else set()), (label, fast, fast_calls)


def test_switch_setting_context_manager_and_environment(monkeypatch) -> None:
    x = torch.ones(3)
    on = cpu_fastpath.fast_path_on()
    with cpu_fastpath.use_fast_path(False):
        assert not cpu_fastpath.enabled(x)
        with cpu_fastpath.use_fast_path(True):
            assert cpu_fastpath.enabled(x) and not cpu_fastpath.enabled(x.to(torch.bfloat16))
            assert not cpu_fastpath.enabled(x.to("meta"))
        assert not cpu_fastpath.enabled(x)
    assert cpu_fastpath.fast_path_on() == on
    for value, expected in (("0", False), ("off", False), ("1", True), ("", True), ("TRUE", True)):
        monkeypatch.setenv(cpu_fastpath.FAST_PATH_ENV, value)
        assert cpu_fastpath._setting_from_env() is expected
    monkeypatch.setenv(cpu_fastpath.FAST_PATH_ENV, "maybe")
    with pytest.raises(ValueError, match="MULTIEMBED_FAST_PATH='maybe'"):
        cpu_fastpath._setting_from_env()
    monkeypatch.delenv(cpu_fastpath.FAST_PATH_ENV)
    assert cpu_fastpath._setting_from_env() is True


@pytest.fixture()
def fresh_probe() -> Iterator[None]:
    cpu_fastpath._onednn_linear.cache_clear()
    yield
    cpu_fastpath._onednn_linear.cache_clear()


def test_gemm_choice_follows_the_machine_and_the_probe(monkeypatch, fresh_probe) -> None:
    assert cpu_fastpath.gemm_backend(torch.float64) == "addmm"
    assert cpu_fastpath.gemm_backend(torch.bfloat16) == "addmm"
    monkeypatch.setattr(cpu_fastpath, "cpu_capability", lambda: "AVX512")
    assert cpu_fastpath.gemm_backend(torch.float32) == ("onednn" if torch.backends.mkldnn.is_available() else "addmm")
    assert cpu_fastpath.gemm_backend(torch.bfloat16) == "addmm"  # oneDNN's matmul under addmm / mm already
    cpu_fastpath._onednn_linear.cache_clear()
    monkeypatch.setattr(cpu_fastpath, "cpu_capability", lambda: "AVX2")  # measured slower than addmm there
    assert cpu_fastpath.gemm_backend(torch.float32) == "addmm"

    def broken(*args, **kwargs):
        raise RuntimeError("mkldnn_linear_pointwise: unsupported")

    cpu_fastpath._onednn_linear.cache_clear()
    monkeypatch.setattr(cpu_fastpath, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(cpu_fastpath, "_linear_pointwise", lambda: broken)
    assert cpu_fastpath.gemm_backend(torch.float32) == "addmm"
    x, weight, bias = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    torch.testing.assert_close(cpu_linear(x, weight, bias), torch.addmm(bias, x, weight.t()))
    cpu_fastpath._onednn_linear.cache_clear()
    monkeypatch.setattr(cpu_fastpath, "_linear_pointwise", lambda: (lambda *args: torch.zeros(2, 4)))  # wrong values
    assert cpu_fastpath.gemm_backend(torch.float32) == "addmm"


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


def test_fast_path_module_examples_run() -> None:
    result = doctest.testmod(cpu_fastpath, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


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
    """The fast path of the cross set arch as a whole (bias carried in the padded GEMM column, the projection
    reading the cross network's padded output in place, ReLU + dropout in one node) against a hand-written
    autograd reference in float64 (float32: the fast path's oneDNN GEMMs where chosen)."""
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
    with cpu_fastpath.use_fast_path(True):
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


@pytest.mark.filterwarnings("ignore:HeuristicalStorageReservation:FutureWarning")
def test_planner_refuses_a_plan_where_the_partitioner_override_did_not_take_effect(monkeypatch) -> None:
    """The other private API of this package's hot paths: ``SetParallelPartitioner`` overrides TorchRec's private
    ``GreedyPerfPartitioner._device_partition``. Simulated here as a TorchRec that no longer calls the override (the
    stock method in its place): the two sets of the light table then share a rank and ``plan_sharding`` refuses the
    plan, naming the versions, instead of quietly giving up set parallelism."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.planner.partitioners import GreedyPerfPartitioner

    from multiembed.runtime.stack import SUPPORTED
    from multiembed.sharding.planner import PARTITION_HOOK_MATCHES, SetParallelPartitioner, plan_sharding

    assert PARTITION_HOOK_MATCHES
    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="heavy", embedding_dim=12, num_embeddings=1000, feature_names=["heavy"]),
         EmbeddingBagConfig(name="light", embedding_dim=24, num_embeddings=10, feature_names=["light"])],
        device=torch.device("meta"),
    )
    options = dict(world_size=2, local_world_size=2, device_type="cuda", hbm_gb=80, set_width=12, batch_size=512,
                   pooling_factors={"heavy": 500.0, "light": 1.0})
    assert sorted(plan_sharding(ebc, "column_wise", **options).plan[""]["light"].ranks) == [0, 1]
    monkeypatch.setattr(SetParallelPartitioner, "_device_partition",
                        GreedyPerfPartitioner.__dict__["_device_partition"])
    with pytest.raises(RuntimeError, match=r"table 'light': column shards on ranks \[1, 1\].*distinct") as error:
        plan_sharding(ebc, "column_wise", **options)
    assert SUPPORTED in str(error.value)
