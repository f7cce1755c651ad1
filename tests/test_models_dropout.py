"""The dropout of the model (``multiembed.models.layers``), on both paths: the CPU fast path's SplitMix64 masks
(``multiembed.models.cpu_fastpath``) and the plain ``F.dropout`` reference. Each is a correct inverted dropout (mask
statistics, exact kept values, eval identity), ReLU + dropout with autograd's gradient, masks governed by
``torch.manual_seed`` (on the fast path independent of the thread count), and fx-traceable modules. The two paths
draw different random streams, so the whole-model comparison of ``test_models_fastpath.py`` runs without masks."""

from __future__ import annotations

import math

import pytest
import torch

import torch.nn.functional as F

from multiembed.models import cpu_fastpath
from multiembed.models.cpu_fastpath import MASK_CHUNK_OUTPUTS, keep_mask, splitmix64
from multiembed.models.layers import ReLUDropout, SetProjection, UniformMaskDropout

SIGMAS = 6.0  # statistical bounds: a correct implementation fails one of these checks with probability ~1e-9


def binomial_bound(n: int, q: float) -> float:
    return SIGMAS * math.sqrt(q * (1 - q) / n)


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def path(request):
    """Runs a test on the fast path and on the plain path; yields which."""
    with cpu_fastpath.use_fast_path(request.param):
        yield request.param


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def splitmix64_reference(seed: int, count: int) -> list:
    """SplitMix64 written out in Python integers (the published algorithm), unsigned outputs."""
    out, state = [], seed % 2**64
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2**62 - 1, 123456789123])
def test_splitmix64_is_the_published_stream(seed: int) -> None:
    got = [int(v) % 2**64 for v in splitmix64(1000, seed)]
    assert got == splitmix64_reference(seed, 1000)
    # The stream's known first outputs for seed 0.
    assert [hex(v) for v in splitmix64_reference(0, 3)] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4",
                                                           "0x6c45d188009454f"]


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_keep_mask_is_bernoulli_seeded_and_thread_count_independent(threads, p: float) -> None:
    # 280,007 elements: three chunks of MASK_CHUNK_OUTPUTS outputs and a partial one; an odd count leaves the last
    # output's high half unused.
    shape = (7, 40001)
    assert shape[0] * shape[1] > 4 * MASK_CHUNK_OUTPUTS
    torch.set_num_threads(1)
    torch.manual_seed(11)
    one_thread = keep_mask(torch.empty(shape), p)
    torch.set_num_threads(2)
    torch.manual_seed(11)
    two_threads = keep_mask(torch.empty(shape), p)
    assert torch.equal(one_thread, two_threads)
    assert not torch.equal(keep_mask(torch.empty(shape), p), two_threads)  # the default generator moved on
    assert one_thread.shape == shape and one_thread.dtype == torch.bool

    kept = two_threads.view(-1).double()
    n = kept.numel()
    assert abs(float(kept.mean()) - (1 - p)) < binomial_bound(n, 1 - p)
    # Neighbours are independent: the two halves of one 64-bit output (even, odd) and neighbours across outputs.
    for first, second in ((kept[0:-1:2], kept[1::2]), (kept[1:-1:2], kept[2::2])):
        both = first * second
        assert abs(float(both.mean()) - (1 - p) ** 2) < binomial_bound(len(both), (1 - p) ** 2)

    # Element i is kept exactly when the i-th 32-bit word of the seed's stream (low half first), as a signed
    # integer, is >= round(p * 2**32) - 2**31: across chunk boundaries the words are the whole stream's.
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    words = splitmix64((n + 1) // 2, seed).view(torch.int32)[:n]
    assert torch.equal(two_threads.view(-1), words >= round(p * 2**32) - 2**31)
    low_high = [w >> s & 0xFFFFFFFF for w in splitmix64_reference(seed, 50) for s in (0, 32)]
    signed = [w - 2**32 if w >= 2**31 else w for w in low_high]
    assert two_threads.view(-1)[:100].tolist() == [w >= round(p * 2**32) - 2**31 for w in signed]


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_uniform_mask_dropout_is_inverted_dropout(p: float, path: bool) -> None:
    torch.manual_seed(0)
    x = torch.rand(1000, 600) + 0.5  # positive, so a kept element is never 0
    dropout = UniformMaskDropout(p)
    out = dropout(x)
    kept = out != 0
    scale = 1.0 / (1.0 - p)
    assert torch.equal(out[kept], x[kept] * scale)  # kept values exactly as nn.Dropout scales them
    n = x.numel()
    assert abs(float(kept.double().mean()) - (1 - p)) < binomial_bound(n, 1 - p)
    # Unbiased: E[out] = x, checked on the mean of out / x (each term scale * Bernoulli(1 - p)).
    ratio = (out / x).double()
    assert abs(float(ratio.mean()) - 1.0) < SIGMAS * scale * math.sqrt(p * (1 - p) / n)

    x.requires_grad_(True)
    out = dropout(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad * (out != 0) * scale)

    assert dropout.eval()(x) is x
    assert UniformMaskDropout(0.0)(x) is x


@pytest.mark.parametrize("p", [0.2, 0.35])
def test_relu_dropout_equals_relu_then_dropout_forward_and_backward(p: float, path: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(2048, 3, 50, requires_grad=True)
    out = ReLUDropout(p)(x)
    scale = 1.0 / (1.0 - p)
    positive = x.detach() > 0
    assert bool((out[~positive] == 0).all())
    kept = out != 0
    assert not bool((kept & ~positive).any())
    assert torch.equal(out[kept], x.detach()[kept] * scale)
    n_positive = int(positive.sum())
    kept_fraction = float(kept.sum()) / n_positive
    assert abs(kept_fraction - (1 - p)) < binomial_bound(n_positive, 1 - p)

    # Reference: autograd through torch.relu and a dropout with the same mask (read off the output).
    grad = torch.randn_like(out)
    out.backward(grad)
    reference_input = x.detach().clone().requires_grad_(True)
    keep = torch.where(kept | ~positive, scale, 0.0)  # the mask of the dropped positives; any mask where x <= 0
    (torch.relu(reference_input) * keep).backward(grad)
    assert torch.equal(x.grad, reference_input.grad)

    activation = ReLUDropout(p).eval()
    assert torch.equal(activation(x), torch.relu(x))
    assert torch.equal(ReLUDropout(0.0)(x), torch.relu(x))


def test_dropout_draws_follow_the_global_seed(path: bool) -> None:
    x = torch.randn(300, 400)
    torch.manual_seed(5)
    a = ReLUDropout(0.2)(x), UniformMaskDropout(0.2)(x)
    torch.manual_seed(5)
    b = ReLUDropout(0.2)(x), UniformMaskDropout(0.2)(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(6)
    assert not torch.equal(ReLUDropout(0.2)(x), a[0])


def test_dropout_modules_validate_and_trace(path: bool) -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout must be in"):
            ReLUDropout(bad)
    projection = SetProjection(num_sets=2, in_features=6, out_features=5, dropout=0.3)
    traced = torch.fx.symbolic_trace(projection)
    assert any(node.target.__name__ == "relu_dropout" for node in traced.graph.nodes if node.op == "call_function")
    x = torch.randn(2, 64, 6)
    torch.manual_seed(3)
    eager = projection(x)
    torch.manual_seed(3)
    torch.testing.assert_close(traced(x), eager, rtol=0, atol=0)


def test_plain_path_is_torchs_dropout_and_the_fast_path_draws_another_stream() -> None:
    x = torch.randn(300, 400)
    with cpu_fastpath.use_fast_path(False):
        torch.manual_seed(7)
        plain = ReLUDropout(0.2)(x), UniformMaskDropout(0.2)(x)
    torch.manual_seed(7)
    expected = F.dropout(F.relu(x), 0.2, training=True), F.dropout(x, 0.2, training=True)
    assert torch.equal(plain[0], expected[0]) and torch.equal(plain[1], expected[1])
    with cpu_fastpath.use_fast_path(True):
        torch.manual_seed(7)
        fast = ReLUDropout(0.2)(x)
    assert not torch.equal(fast, plain[0])
