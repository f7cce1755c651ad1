"""Model names and parameter counts (computed here from the layer formulas, not read back from the model)."""

from __future__ import annotations

import pytest
import torch

from multiembed.models import (
    BACKBONES,
    BASE_SET_DIM,
    PAPER_SCALES,
    ModelSpec,
    build_model,
    model_names,
    parse_model_name,
)

try:
    from multiembed.data.presets import preset

    CRITEO = dict(preset("criteo-kaggle").vocab_sizes)
except ImportError:  # dense counts do not depend on the vocabulary
    CRITEO = {f"C{i}": 1000 + i for i in range(39)}

META = torch.device("meta")
H = 400


def bn(width: int) -> int:
    return 2 * width


def linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def projection(fan_in: int) -> int:
    return linear(fan_in, H) + bn(H)


def over_mlp(fan_in: int = H) -> int:
    return linear(fan_in, H) + bn(H) + linear(H, 1)


def expected_dense_params(backbone: str, mode: str, k: int, d: int, f: int) -> int:
    """Trainable non-embedding parameters of the paper's form, from the layer formulas."""
    pairs = f * (f - 1) // 2
    flat = f * d
    if backbone == "dnn":
        per_set = projection(flat)
    elif backbone == "dcnv2":
        per_set = 4 * (flat * flat + flat) + projection(flat)
    elif backbone == "dcnv2lr":
        per_set = 3 * (2 * flat * 512 + flat) + projection(flat)
    elif backbone == "ipnn":
        per_set = projection(pairs + (flat if mode == "se" else 0))
    elif backbone == "nfwfm":
        per_set = f * f + bn(d) + projection(d)
    elif backbone == "xdeepfm":
        cin = (16 * f * f + 16) + (16 * f * 16 + 16)  # Conv1d(F*F -> 16), Conv1d(F*16 -> 16)
        per_set = cin + projection(flat)
    elif backbone == "finalmlp":
        per_set = 2 * (projection(flat) + projection(H))
    elif backbone in ("dlrm", "ffm"):
        per_set = projection(pairs)
    else:
        raise AssertionError(backbone)
    if backbone == "finalmlp":
        head = 2 * linear(H, 1) + H * H  # bilinear fusion
    elif backbone == "xdeepfm":
        head = linear(32, 1) + over_mlp()
    else:
        head = over_mlp()
    return k * per_set + head


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["se", "me"])
def test_dense_params_follow_the_layer_formulas(backbone: str, mode: str) -> None:
    model = build_model(f"{backbone}-{mode}-3x", CRITEO, device=META, dense_device=META)
    spec = parse_model_name(f"{backbone}-{mode}-3x")
    assert model.dense_params == expected_dense_params(backbone, mode, spec.num_sets, spec.set_dim, len(CRITEO))


def test_dcnv2_dense_params_at_10x_are_the_papers() -> None:
    """The paper: about 62.6M dense parameters for SE DCNv2 at 10x on Criteo, about 7.8M for ME."""
    assert len(CRITEO) == 39
    se = build_model("dcnv2-se-10x", CRITEO, device=META, dense_device=META)
    me = build_model("dcnv2-me-10x", CRITEO, device=META, dense_device=META)
    # SE: 4 cross layers on 39*100 = 3900 dims, then 3900 -> 400 -> 400 -> 1.
    se_expected = 4 * (3900 * 3900 + 3900) + (3900 * 400 + 400 + 800) + (400 * 400 + 400 + 800) + 401
    # ME: 10 sets of 4 cross layers on 390 dims + 390 -> 400 projection, then the shared 400 -> 400 -> 1.
    me_expected = 10 * (4 * (390 * 390 + 390) + 390 * 400 + 400 + 800) + (400 * 400 + 400 + 800) + 401
    assert se.dense_params == se_expected and round(se_expected / 1e6, 1) == 62.6
    assert me.dense_params == me_expected and round(me_expected / 1e6, 1) == 7.8


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("scale", PAPER_SCALES)
def test_se_and_me_have_equal_embedding_params_at_every_scale(backbone: str, scale: int) -> None:
    rows = sum(CRITEO.values())
    base = BASE_SET_DIM[backbone]
    counts = {}
    for mode in ("se", "me", "mesi"):
        model = build_model(f"{backbone}-{mode}-{scale}x", CRITEO, device=META, dense_device=META)
        counts[mode] = model.embedding_params
        k, d = model.sparse_arch.num_sets, model.sparse_arch.set_dim
        stored = -(-d // 4) * 4
        assert model.embedding_bytes == rows * k * stored * 4
    assert counts["se"] == counts["me"] == counts["mesi"] == rows * base * scale


def test_dense_arch_adds_one_field_and_its_mlp() -> None:
    vocab = {f"C{i}": 100 for i in range(26)}
    without = build_model("dlrm-me-2x", vocab, 0, device=META, dense_device=META)
    with_dense = build_model("dlrm-me-2x", vocab, 13, device=META, dense_device=META)
    mlp = linear(13, 512) + linear(512, 256) + linear(256, 2 * 16)
    # 27 fields instead of 26 and the dense field's 16 values join the 27*26/2 dot products.
    assert with_dense.dense_params - without.dense_params == mlp + 2 * (27 * 26 // 2 + 16 - 26 * 25 // 2) * H


def test_model_names_parse() -> None:
    assert parse_model_name("dcnv2-me-4x") == ModelSpec("dcnv2", "me", 4, 4, 10)
    assert parse_model_name("dcnv2-se-4x") == ModelSpec("dcnv2", "se", 4, 1, 40)
    assert parse_model_name("dcnv2-me-4x16") == ModelSpec("dcnv2", "me", 4, 4, 16)
    assert parse_model_name("dcnv2-se-4x16") == ModelSpec("dcnv2", "se", 4, 1, 64)
    assert parse_model_name("nfwfm-mesi-2x") == ModelSpec("nfwfm", "mesi", 2, 2, 50)
    assert parse_model_name("dlrm-se-1x").set_dim == 16
    names = model_names()
    assert len(names) == len(BACKBONES) * 3 * len(PAPER_SCALES) and "dnn-se-10x" in names
    for name in names + ["dcnv2-me-4x16", "dcnv2-se-3x12"]:
        assert parse_model_name(parse_model_name(name).name) == parse_model_name(name)


@pytest.mark.parametrize(
    "name, needle",
    [
        ("dcnv3-me-4x", "backbone 'dcnv3'"),
        ("dcnv2-xe-4x", "mode 'xe'"),
        ("dcnv2-me-0x", "scale 0"),
        ("dcnv2-me-4", "does not match"),
        ("dcnv2-me-4x0", "width must be at least 1"),
        ("", "does not match"),
    ],
)
def test_bad_model_names_list_the_valid_ones(name: str, needle: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_model_name(name)
    assert needle in str(error.value)
    assert "dnn, ipnn, nfwfm, xdeepfm, dcnv2, dcnv2lr, finalmlp, dlrm" in str(error.value)


def test_build_model_rejects_bad_options() -> None:
    vocab = {"a": 3, "b": 4}
    with pytest.raises(ValueError, match="unknown option.*cross_rank.*dcnv2 takes"):
        build_model("dcnv2-me-2x", vocab, cross_rank=8)
    with pytest.raises(ValueError, match="over_layer_sizes"):
        build_model("finalmlp-me-2x", vocab, over_layer_sizes=(10,))
    with pytest.raises(ValueError, match="unknown layout"):
        build_model("dnn-me-2x", vocab, layout="striped")
    with pytest.raises(ValueError, match="dropout"):
        build_model("dnn-me-2x", vocab, dropout=1.5)
    with pytest.raises(ValueError, match="vocab_sizes is empty"):
        build_model("dnn-me-2x", {})
    with pytest.raises(ValueError, match="num_weight_sets"):
        from multiembed.models import BatchedLinear

        BatchedLinear(num_sets=4, in_features=3, out_features=2, num_weight_sets=3)


def test_options_change_the_architecture() -> None:
    vocab = {"a": 3, "b": 4, "c": 5}
    model = build_model("dcnv2lr-me-2x", vocab, device=META, dense_device=META, cross_layers=2, cross_rank=7)
    assert len(model.set_arch.crossnet.W_kernels) == 2 and model.set_arch.crossnet.W_kernels[0].shape == (2, 30, 7)
    model = build_model("ipnn-me-2x", vocab, device=META, dense_device=META, include_embeddings=True)
    assert model.set_arch.projection.in_features == 3 + 30
    model = build_model("dnn-me-2x", vocab, device=META, dense_device=META, hidden=32, over_layer_sizes=(16, 8))
    assert model.set_arch.output_dim == 32 and model.dense_params == 2 * (30 * 32 + 32 + 64) + (
        linear(32, 16) + bn(16) + linear(16, 8) + bn(8) + linear(8, 1)
    )


@pytest.mark.parametrize("backbone", BACKBONES)
def test_dense_arches_built_on_meta_are_fully_initialised_by_reset_parameters(backbone: str) -> None:
    """DMP materialises ``meta`` modules with ``to_empty`` then ``module.apply(reset_parameters)``: every dense
    parameter and buffer must be written by some module's ``reset_parameters``."""
    model = build_model(f"{backbone}-mesi-2x", {"a": 5, "b": 6, "c": 7}, 3, device=META, dense_device=META, hidden=8)
    for part in (model.set_arch, model.over_arch, model.dense_arch):
        part.to_empty(device=torch.device("cpu"))
        with torch.no_grad():
            for tensor in list(part.parameters()) + [b for b in part.buffers() if b.is_floating_point()]:
                tensor.fill_(float("nan"))
        part.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        for name, tensor in list(part.named_parameters()) + list(part.named_buffers()):
            assert torch.isfinite(tensor.float()).all(), f"{backbone}: {name} not initialised by reset_parameters"


@pytest.mark.parametrize("name", ["dcnv2-me-2x", "xdeepfm-me-2x", "finalmlp-me-2x"])
def test_set_output_bias_sets_the_logits_constant_term(name: str) -> None:
    """After ``set_output_bias(v)`` the over arch's logits move by exactly ``v`` minus the old constant term (the sum
    of its output biases), on every over arch (MLP, CIN read-out + MLP, FinalMLP's bilinear fusion)."""
    from multiembed.models import build_model

    torch.manual_seed(0)
    model = build_model(name, {"f1": 10, "f2": 20, "f3": 5}, device=torch.device("cpu"), hidden=16).eval()
    features = torch.randn(8, model.over_arch.in_features)
    before = model.over_arch(features)
    old = sum(float(b) for b in model.over_arch.output_biases())
    model.set_output_bias(-1.5)
    biases = [float(b) for b in model.over_arch.output_biases()]
    assert biases[0] == -1.5 and all(b == 0.0 for b in biases[1:])
    torch.testing.assert_close(model.over_arch(features) - before, torch.full((8,), -1.5 - old), rtol=0, atol=1e-5)
