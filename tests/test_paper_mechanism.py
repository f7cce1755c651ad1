"""The paper's mechanism figures 3, 5, 6 and 8: FFM, the cross-map regularisers, the sub-embedding IA and the
commands that draw them from tiny trained runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import matplotlib.image
import numpy as np
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.analysis.paper_mechanism import (
    SubEmbeddingView,
    best_train_loss,
    mean_view,
    norm_spread,
    rank_correlation,
    scale_means,
    tercile_means,
)
from multiembed.analysis.scaling import STUDY_MODES, StudyPoint
from multiembed.analysis.study import run_options
from multiembed.cli import main as cli_main
from multiembed.collapse import collapse_from_model, information_abundance, singular_values
from multiembed.config import TrainConfig
from multiembed.models import MultiEmbeddingTrain, build_model
from multiembed.models.interactions import BatchedCrossNet, FieldAwareInnerProducts, cross_network
from multiembed.models.regularizers import ProjectionRegularizer, field_pair_norms, set_divergence_penalty

VOCAB = {"a": 13, "b": 11, "c": 9}


# ------------------------------------------------------------------------------------------------------------ FFM
def test_ffm_products_equal_the_direct_formula() -> None:
    """<e_i^(j), e_j^(i)> with field i's sub-embedding for j its block j (j < i) or j - 1 (j > i), width d // (F-1);
    the leftover column takes part in nothing."""
    torch.manual_seed(0)
    f, d, s = 4, 7, 2  # 3 sub-embeddings of width 2, column 6 unused
    x = torch.randn(2, 5, f, d)
    expected = []
    for i in range(f):
        for j in range(i + 1, f):
            bi, bj = j - 1, i  # field i's block for j > i; field j's block for i < j
            expected.append((x[..., i, bi * s : (bi + 1) * s] * x[..., j, bj * s : (bj + 1) * s]).sum(-1))
    products = FieldAwareInnerProducts(f, d)
    assert torch.allclose(products(x), torch.stack(expected, dim=-1), atol=1e-6)
    changed = x.clone()
    changed[..., 6] += 100.0
    assert torch.equal(products(changed), products(x))


def test_ffm_model_is_registered_and_refuses_a_too_narrow_width() -> None:
    model = build_model("ffm-se-1x4", VOCAB, device=torch.device("cpu"), hidden=8)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(VOCAB), values=torch.tensor([1, 2, 3, 4, 5, 6]),
                                              lengths=torch.ones(6, dtype=torch.int64))
    assert model(torch.empty(2, 0), kjt).shape == (2,)
    assert build_model("ffm-me-2x4", VOCAB, device=torch.device("cpu"), hidden=8).set_arch.products.sub_dim == 2
    with pytest.raises(ValueError, match="set width 1 is below the 2 sub-embeddings each field needs"):
        build_model("ffm-se-1x1", VOCAB, device=torch.device("cpu"), hidden=8)


def test_ffm_sub_embedding_ia_is_the_ia_of_each_block() -> None:
    """collapse_from_model's sub-embedding IA of FFM: ia[i][j] is the IA of the columns field j meets, the diagonal
    the whole table's."""
    torch.manual_seed(1)
    model = build_model("ffm-se-1x4", VOCAB, device=torch.device("cpu"), hidden=8)
    result = collapse_from_model(model)
    tables = model.sparse_arch.weights_per_set()[0]
    products = model.set_arch.products
    ia = result.sub_embedding[0]["ia"]
    fields = result.sub_embedding[0]["fields"]
    for i, source in enumerate(fields):
        table = tables[source].double()
        for j in range(len(fields)):
            if i == j:
                columns = table
            else:
                b = products.sub_embedding_block(i, j)
                columns = table[:, 2 * b : 2 * b + 2]
            assert ia[i][j] == pytest.approx(information_abundance(singular_values(columns)), rel=1e-9)
        assert ia[i][i] == pytest.approx(result.sets[0][source], rel=1e-9)


def test_sub_embedding_trend_on_a_constructed_case() -> None:
    # Rows (seen) and columns (seeing) both rise with the fields' own IA: both correlations are 1.
    # ia[i][j] = own IA of i + own IA of j (fields listed b, a, c).
    view = SubEmbeddingView("x", "m", ["b", "a", "c"], {"a": 1.0, "b": 2.0, "c": 3.0},
                            [[0.0, 3.0, 5.0], [3.0, 0.0, 4.0], [5.0, 4.0, 0.0]])
    assert view.order() == [1, 0, 2]
    assert view.trend() == {"rho_source": pytest.approx(1.0), "rho_target": pytest.approx(1.0)}
    # Seen rows rising, seeing columns falling with the own IA.
    falling = SubEmbeddingView("x", "m", ["a", "b", "c"], {"a": 1.0, "b": 2.0, "c": 3.0},
                               [[0.0, 2.0, 1.0], [4.0, 0.0, 2.5], [6.0, 5.0, 0.0]])
    assert falling.trend() == {"rho_source": pytest.approx(1.0), "rho_target": pytest.approx(-1.0)}
    # Falling with the own IA: -1; a constant series has no rank correlation.
    assert rank_correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
    assert rank_correlation([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.9486832980505138)


# --------------------------------------------------------------------------------------------- the regularisers
def _blocks(weight: torch.Tensor, d: int) -> List[List[torch.Tensor]]:
    f = weight.shape[0] // d
    return [[weight[j * d : (j + 1) * d, i * d : (i + 1) * d] for j in range(f)] for i in range(f)]  # [i][j]


def test_projection_regularizer_by_hand() -> None:
    torch.manual_seed(2)
    weight = torch.randn(1, 6, 6)  # 3 fields of d = 2
    regularizer = ProjectionRegularizer(1, 3, 2)
    assert torch.equal(regularizer.lambdas.detach(), torch.ones(1, 3, 3))
    with torch.no_grad():
        regularizer.lambdas.copy_(torch.arange(9.0).view(1, 3, 3) / 4)
    expected = 0.0
    for i, row in enumerate(_blocks(weight[0], 2)):
        for j, w in enumerate(row):
            expected += float(((w.T @ w - regularizer.lambdas[0, i, j] * torch.eye(2)) ** 2).sum())
    assert float(regularizer(weight)) == pytest.approx(expected, rel=1e-6)
    # Every block an orthogonal map scaled by sqrt(lambda) = 3 costs nothing.
    q = torch.linalg.qr(torch.randn(2, 2)).Q
    ortho = torch.cat([torch.cat([q * 3.0] * 3, dim=1)] * 3, dim=0).unsqueeze(0)
    with torch.no_grad():
        regularizer.lambdas.fill_(9.0)
    assert float(regularizer(ortho)) == pytest.approx(0.0, abs=1e-8)


def test_set_divergence_penalty_by_hand() -> None:
    torch.manual_seed(3)
    weight = torch.randn(3, 4, 4)  # 3 sets, 2 fields of d = 2
    norms = [[[float(torch.linalg.norm(w)) for w in row] for row in _blocks(weight[m], 2)] for m in range(3)]
    expected = sum(float(np.var([norms[m][i][j] for m in range(3)], ddof=1)) for i in range(2) for j in range(2))
    assert float(set_divergence_penalty(weight, 2)) == pytest.approx(expected, rel=1e-6)
    assert field_pair_norms(weight, 2)[1, 0, 1] == pytest.approx(norms[1][0][1])
    with pytest.raises(ValueError, match="at least 2 weight sets"):
        set_divergence_penalty(weight[:1], 2)
    assert norm_spread(np.array([[[1.0, 2.0]], [[3.0, 2.0]]])) == pytest.approx(0.25)


def _batch() -> Batch:
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(VOCAB), values=torch.tensor([1, 2, 3, 4, 5, 6]),
                                              lengths=torch.ones(6, dtype=torch.int64))
    return Batch(dense_features=torch.empty(2, 0), sparse_features=kjt, labels=torch.tensor([0.0, 1.0]))


def test_train_module_adds_the_regularisers_to_the_loss() -> None:
    torch.manual_seed(4)
    model = build_model("dcnv2-me-2x", VOCAB, device=torch.device("cpu"), hidden=8)
    model.eval()
    base, _ = MultiEmbeddingTrain(model)(_batch())
    projected = MultiEmbeddingTrain(model, projection_reg_weight=0.5)
    loss, _ = projected(_batch())
    first = model.set_arch.crossnet.weights[0]
    assert float(loss) == pytest.approx(float(base) + 0.5 * float(projected.projection_regularizer(first)), rel=1e-6)
    loss.backward()
    assert "projection_regularizer.lambdas" in dict(projected.named_parameters())
    assert projected.projection_regularizer.lambdas.grad is not None
    diverging, _ = MultiEmbeddingTrain(model, divergence_reg_weight=0.25)(_batch())
    assert float(diverging) == pytest.approx(float(base) + 0.25 * float(set_divergence_penalty(first, 10)), rel=1e-6)


def _pair_scaled(seed: int) -> "torch.nn.Module":
    torch.manual_seed(seed)
    return build_model("dcnv2-se-1x", VOCAB, device=torch.device("cpu"), hidden=8, pair_scales=True)


def test_pair_scales_multiply_each_field_pair_map_of_the_first_layer() -> None:
    torch.manual_seed(5)
    cross = BatchedCrossNet(num_sets=2, in_features=6, num_layers=2, pair_scale_dim=2)  # 3 fields of d = 2
    assert torch.equal(cross.pair_scales.detach(), torch.ones(2, 3, 3))
    x = torch.randn(2, 4, 6)
    plain = BatchedCrossNet(num_sets=2, in_features=6, num_layers=2)
    plain.load_state_dict({k: v for k, v in cross.state_dict().items() if k != "pair_scales"})
    assert torch.allclose(cross(x), plain(x), atol=1e-6)  # N = 1: the plain cross net
    with torch.no_grad():
        cross.pair_scales.copy_(torch.arange(18.0).view(2, 3, 3) / 7)
    scaled = cross.layer_weight(0)
    for g in range(2):
        for i, row in enumerate(_blocks(cross.weights[0][g].detach(), 2)):
            for j, w in enumerate(row):
                block = scaled[g, j * 2 : (j + 1) * 2, i * 2 : (i + 1) * 2]
                assert torch.allclose(block, cross.pair_scales[g, i, j] * w)
    assert torch.equal(cross.layer_weight(1), cross.weights[1])  # only the first layer is scaled
    expected = x
    for weight, bias in zip((scaled, cross.weights[1]), cross.biases):
        expected = x * (torch.bmm(expected, weight.transpose(1, 2)) + bias.unsqueeze(1)) + expected
    assert torch.allclose(cross(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="pair_scale_dim must be >= 1 and divide in_features 6"):
        BatchedCrossNet(num_sets=1, in_features=6, num_layers=1, pair_scale_dim=4)


def test_pair_scales_get_the_gradient_and_the_penalty_reads_the_unscaled_maps() -> None:
    """The paper's weighted regularised DCNv2: N_ij W_ij in the forward pass, the projection regulariser on W_ij."""
    model = _pair_scaled(6)
    model.eval()
    crossnet = model.set_arch.crossnet
    assert crossnet.pair_scales.shape == (1, 3, 3)
    with torch.no_grad():  # every block 2 I: W^T W - lambda I = 4 I - I, so 9 * d = 90 a pair, 9 pairs
        crossnet.weights[0].copy_(torch.kron(torch.ones(3, 3), 2.0 * torch.eye(10)).unsqueeze(0))
        crossnet.pair_scales.fill_(0.5)
    base, _ = MultiEmbeddingTrain(model)(_batch())
    train = MultiEmbeddingTrain(model, projection_reg_weight=0.01)
    loss, _ = train(_batch())
    assert float(train.projection_regularizer(crossnet.weights[0])) == pytest.approx(810.0)
    assert float(loss) == pytest.approx(float(base) + 0.01 * 810.0, rel=1e-6)
    loss.backward()
    grad = crossnet.pair_scales.grad
    assert grad is not None and grad.abs().sum() > 0
    # dL/dN_ij = <dL/d(N W)_block, W_block>: autograd through layer_weight against the chain rule by hand.
    x0 = torch.randn(1, 5, 30)
    rest, biases = [w.detach() for w in crossnet.weights[1:]], [b.detach() for b in crossnet.biases]
    effective = crossnet.layer_weight(0).detach().requires_grad_(True)
    cross_network(x0, [effective, *rest], biases).sum().backward()
    crossnet.pair_scales.grad = None
    cross_network(x0, [crossnet.layer_weight(0), *rest], biases).sum().backward()
    raw = _blocks(crossnet.weights[0][0].detach(), 10)
    upstream = _blocks(effective.grad[0], 10)
    for i in range(3):
        for j in range(3):
            assert float(crossnet.pair_scales.grad[0, i, j]) == pytest.approx(
                float((upstream[i][j] * raw[i][j]).sum()), rel=1e-4, abs=1e-6)
    # The sub-embedding analysis reads the map the layer applies.
    assert torch.allclose(model.set_arch.cross_weights(0), crossnet.layer_weight(0).detach())


def test_pair_scales_refuse_other_backbones() -> None:
    from multiembed.training.build import model_options

    with pytest.raises(ValueError, match="unknown option.*pair_scales"):
        build_model("dnn-se-1x", VOCAB, device=torch.device("cpu"), hidden=8, pair_scales=True)
    for model in ("dnn-se-1x", "dcnv2lr-se-1x", "ffm-se-1x4", "hetero-me-2x"):
        with pytest.raises(ValueError, match=f"--pair-scales: scales the field-pair maps of DCNv2's full-rank cross "
                                             f"layer; {model} has none"):
            model_options(TrainConfig(data="d", model=model, out="o", pair_scales=True))
    assert model_options(TrainConfig(data="d", model="dcnv2-me-2x", out="o", pair_scales=True)) == {
        "pair_scales": True}
    assert model_options(TrainConfig(data="d", model="dcnv2-me-2x", out="o")) == {}


def test_regularisers_refuse_models_without_the_maps() -> None:
    dnn = build_model("dnn-se-1x", VOCAB, device=torch.device("cpu"), hidden=8)
    with pytest.raises(ValueError, match="projection_reg_weight: needs a full-rank DCNv2"):
        MultiEmbeddingTrain(dnn, projection_reg_weight=1e-4)
    se = build_model("dcnv2-se-2x", VOCAB, device=torch.device("cpu"), hidden=8)
    with pytest.raises(ValueError, match="needs at least 2 sets with their own cross net"):
        MultiEmbeddingTrain(se, divergence_reg_weight=1e-3)
    with pytest.raises(ValueError, match="--projection-reg: must be >= 0"):
        TrainConfig(data="d", model="dcnv2-se-1x", out="o", projection_reg=-1.0).validate()


def test_study_modes_train_with_their_weight_only() -> None:
    from multiembed.analysis.study import TRAIN_OPTIONS, resolve_options

    chosen = resolve_options({}, None)
    options = {k: chosen[k] for k in TRAIN_OPTIONS}
    assert chosen["projection_reg"] == 1e-4 and chosen["divergence_reg"] == 1e-3
    pr = run_options(StudyPoint("dcnv2", "se-pr", 2, 0), options)
    dr = run_options(StudyPoint("dcnv2", "me-dr", 2, 0), options)
    se = run_options(StudyPoint("dcnv2", "se", 2, 0), options)
    assert (pr["projection_reg"], pr["divergence_reg"], pr["spectral_reg"]) == (1e-4, 0.0, 0.0)
    assert (dr["projection_reg"], dr["divergence_reg"]) == (0.0, 1e-3)
    assert (se["projection_reg"], se["divergence_reg"]) == (0.0, 0.0)
    assert StudyPoint("dcnv2", "se-pr", 2, 0).model == "dcnv2-se-2x" and STUDY_MODES["me-dr"].model_mode == "me"
    pwr = run_options(StudyPoint("dcnv2", "se-pwr", 2, 0), options)
    assert (pwr["projection_reg"], pwr["pair_scales"]) == (1e-4, True)
    assert not pr["pair_scales"] and not se["pair_scales"] and not dr["pair_scales"]
    assert StudyPoint("dcnv2", "se-pwr", 2, 0).model == "dcnv2-se-2x"


def test_scale_means_and_best_train_loss(tmp_path: Path) -> None:
    rows = [{"backbone": "dnn", "mode": "se", "scale": s, "seed": k, "test_auc": 0.5 + s / 10 + k / 100}
            for s in (2, 1) for k in (0, 1)]
    means = scale_means(rows, "test_auc")
    assert list(means) == ["dnn se"] and means["dnn se"]["scales"] == [1, 2] and means["dnn se"]["seeds"] == [2, 2]
    assert means["dnn se"]["mean"] == pytest.approx([0.605, 0.705])
    assert means["dnn se"]["min"] == pytest.approx([0.6, 0.7]) and means["dnn se"]["max"] == pytest.approx([0.61, 0.71])
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"best_step": 20}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "train_loss": s / 100}) for s in (10, 20, 30)))
    assert best_train_loss(run) == 0.2
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "train_loss": 0.1}) + "\n{broken\n")
    with pytest.raises(ValueError, match="metrics.jsonl: line 2: not valid JSON"):
        best_train_loss(run)


# ------------------------------------------------------------------------------------- the commands, tiny runs
TINY = ["--batch-size", "256", "--hidden", "16", "--epochs", "1", "--max-steps", "4", "--eval-every", "2",
        "--ia-every", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The collapse regime (8 fields), tiny: DCNv2 se, se-pr, se-pwr and me, DNN se at 1x and 2x (se-pr and se-pwr
    also at a second weight); ME+DR at 2x; an FFM."""
    root = tmp_path_factory.mktemp("paper")
    data = root / "data"
    assert cli_main(["synth", "--regime", "collapse", "--rows", "3000", "--out", str(data), "--seed", "4",
                     "--no-progress"]) == 0
    scale = ["scale", "--data", str(data), "--seeds", "1", *TINY]
    assert cli_main([*scale, "--out", str(root / "dcnv2"), "--backbones", "dcnv2", "--modes", "se,se-pr,se-pwr,me",
                     "--scales", "1,2"]) == 0
    assert cli_main([*scale, "--out", str(root / "pr5"), "--backbones", "dcnv2", "--modes", "se-pr,se-pwr",
                     "--scales", "1,2", "--projection-reg", "1e-5"]) == 0
    assert cli_main([*scale, "--out", str(root / "dnn"), "--backbones", "dnn", "--modes", "se",
                     "--scales", "1,2"]) == 0
    assert cli_main([*scale, "--out", str(root / "dr"), "--backbones", "dcnv2", "--modes", "me-dr",
                     "--scales", "2", "--divergence-reg", "0.01"]) == 0
    assert cli_main(["train", "--data", str(data), "--model", "ffm-se-1x14", "--out", str(root / "ffm"),
                     *TINY]) == 0
    return root


def test_fig3_sub_embedding_ia_of_ffm_and_dcnv2(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fig3"
    dcnv2 = [str(tiny / "dcnv2" / "runs" / f"dcnv2-{mode}-1x-seed0") for mode in ("se", "se-pr")]
    assert cli_main(["paper", "fig3", "--ffm-run", str(tiny / "ffm"), "--dcnv2-run", dcnv2[0], "--dcnv2-run",
                     dcnv2[1], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FFM (ffm-se-1x14, 1 runs): rank correlation" in printed and "DCNv2 (dcnv2-se-1x, 2 runs)" in printed
    record = json.loads((out / "fig3.json").read_text())
    assert set(record["models"]) == {"FFM", "DCNv2"}
    entry = record["models"]["DCNv2"]
    assert list(entry["runs"]) == ["dcnv2-se-1x-seed0", "dcnv2-se-pr-1x-seed0"]
    rhos = [run["rho_source"] for run in entry["runs"].values()]
    assert entry["rho_source"] == {"mean": pytest.approx(np.mean(rhos)), "min": min(rhos), "max": max(rhos)}
    assert np.asarray(entry["mean_view"]["tercile_means"]).shape == (3, 3)
    lines = (out / "fig3.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["model", "run"] and len(lines) == 1 + 3 * 8 * 8
    rows = [line.split(",") for line in lines[1:]]
    ffm = [r for r in rows if r[0] == "ffm-se-1x14"]
    # FFM's sub-embeddings have width 14 // 7 = 2: their IA is at most 2; the diagonal is the whole table's.
    assert all(float(r[8]) <= 2.0 + 1e-9 for r in ffm if r[2] != r[3])
    assert all(float(r[8]) == pytest.approx(float(r[6]), abs=1e-6) for r in ffm if r[2] == r[3])
    # The mean view's own IA is the mean over the two DCNv2 runs.
    field = entry["mean_view"]["fields_by_own_ia"][0]
    own = [float(r[6]) for r in rows if r[0] == "dcnv2-se-1x" and r[2] == field and r[3] == field]
    assert entry["mean_view"]["own_ia"][field] == pytest.approx(np.mean(own), abs=1e-5)
    assert matplotlib.image.imread(out / "fig3.png").ndim == 3
    assert cli_main(["paper", "fig3", "--ffm-run", str(tiny / "dnn" / "runs" / "dnn-se-1x-seed0"), "--dcnv2-run",
                     str(tiny / "ffm"), "--out", str(out)]) == 2
    assert "no sub-embedding IA" in capsys.readouterr().err


def test_mean_view_and_tercile_means() -> None:
    a = SubEmbeddingView("x", "m", ["a", "b", "c"], {"a": 1.0, "b": 2.0, "c": 3.0},
                         [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    b = SubEmbeddingView("x", "m", ["a", "b", "c"], {"a": 3.0, "b": 2.0, "c": 7.0},
                         [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0, 10.0, 11.0]])
    mean = mean_view([a, b])
    assert mean.own_ia == {"a": 2.0, "b": 2.0, "c": 5.0}
    assert mean.ia == [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0], [8.0, 9.0, 10.0]]
    # Fields by own IA: a (2.0, tie broken by position), b, c; one field a third, the diagonal left out.
    terciles = tercile_means(mean)
    assert terciles[0][1:] == [3.0, 4.0] and terciles[2][:2] == [8.0, 9.0] and np.isnan(terciles[1][1])
    with pytest.raises(ValueError, match="has other fields"):
        mean_view([a, SubEmbeddingView("x", "n", ["a", "b"], {"a": 1.0, "b": 1.0}, [[1.0, 1.0], [1.0, 1.0]])])


def test_fig5_fig6_and_fig8_draw_the_studies(tiny: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["paper", "fig5", "--study", str(tiny / "dcnv2"), "--study", str(tiny / "pr5"),
                     "--out", str(tmp_path / "f5")]) == 0
    fig5 = json.loads((tmp_path / "f5" / "fig5.json").read_text())
    series = {"dcnv2 se", "dcnv2 se-pr 0.0001", "dcnv2 se-pwr 0.0001", "dcnv2 se-pr 1e-05", "dcnv2 se-pwr 1e-05"}
    assert fig5["projection_reg"] == {"dcnv2 se-pr 0.0001": 1e-4, "dcnv2 se-pwr 0.0001": 1e-4,
                                      "dcnv2 se-pr 1e-05": 1e-5, "dcnv2 se-pwr 1e-05": 1e-5}
    assert fig5["labels"]["dcnv2 se-pwr 1e-05"] == "DCNv2, weighted regularised, 1e-05"
    assert set(fig5["means"]) == {"ia_mean", "train_loss", "val_auc", "test_auc"}
    assert set(fig5["means"]["test_auc"]) == series
    run = tiny / "pr5" / "runs" / "dcnv2-se-pwr-2x-seed0"
    assert fig5["means"]["train_loss"]["dcnv2 se-pwr 1e-05"]["mean"][1] == best_train_loss(run)
    assert json.loads((run / "config.json").read_text())["options"]["pair_scales"] is True
    assert len((tmp_path / "f5" / "fig5.csv").read_text().splitlines()) == 1 + 5 * 2
    assert cli_main(["paper", "fig5", "--study", str(tiny / "dcnv2"), "--study", str(tiny / "dcnv2"),
                     "--out", str(tmp_path / "f5")]) == 2
    assert "run dcnv2-se-1x-seed0 (se) is also in" in capsys.readouterr().err
    assert cli_main(["paper", "fig5", "--study", str(tiny / "dnn"), "--out", str(tmp_path / "f5")]) == 2
    assert "hold no dcnv2 se runs beside se-pr or se-pwr runs" in capsys.readouterr().err

    assert cli_main(["paper", "fig6", "--study", str(tiny / "dnn"), "--study", str(tiny / "dcnv2"),
                     "--out", str(tmp_path / "f6")]) == 0
    fig6 = json.loads((tmp_path / "f6" / "fig6.json").read_text())
    assert set(fig6["means"]["ia_mean"]) == {"dnn se", "dcnv2 se"}
    assert fig6["means"]["ia_mean"]["dnn se"]["scales"] == [1, 2]
    assert len((tmp_path / "f6" / "fig6.csv").read_text().splitlines()) == 1 + 4
    assert cli_main(["paper", "fig6", "--study", str(tiny / "dnn"), "--out", str(tmp_path / "f6")]) == 2
    assert "the studies hold no dcnv2 se runs" in capsys.readouterr().err

    assert cli_main(["paper", "fig8", "--study", str(tiny / "dcnv2"), "--ablation", str(tiny / "dr"), "--scale", "2",
                     "--out", str(tmp_path / "f8")]) == 0
    assert "ME, divergence penalty mu=0.01" in capsys.readouterr().out
    fig8 = json.loads((tmp_path / "f8" / "fig8.json").read_text())
    panels = fig8["panels"]
    assert len(panels["ia_per_set"]) == 2 and np.asarray(panels["norms"]).shape == (2, 8, 8)
    assert set(panels["norm_spread_by_mode"]) == {"me", "me-dr 0.01"}
    assert panels["norm_spread"] == pytest.approx(panels["norm_spread_by_mode"]["me"]["mean"])
    assert set(fig8["test_auc"]) == {"dcnv2 se", "dcnv2 me", "dcnv2 me-dr 0.01"}
    assert matplotlib.image.imread(tmp_path / "f8" / "fig8.png").ndim == 3
    assert cli_main(["paper", "fig8", "--study", str(tiny / "dcnv2"), "--ablation", str(tiny / "dcnv2"),
                     "--out", str(tmp_path / "f8")]) == 2
    assert "holds no me-dr runs" in capsys.readouterr().err


def test_study_refuses_regularised_modes_on_other_backbones(tiny: Path, tmp_path: Path, capsys) -> None:
    base = ["scale", "--data", str(tiny / "data"), "--out", str(tmp_path / "s"), "--seeds", "1", *TINY]
    assert cli_main([*base, "--backbones", "dnn", "--modes", "se-pr", "--scales", "1"]) == 2
    assert "--modes se-pr: regularises DCNv2's cross maps, dnn has none" in capsys.readouterr().err
    assert cli_main([*base, "--backbones", "dcnv2lr", "--modes", "se-pwr", "--scales", "1"]) == 2
    assert "--modes se-pwr: regularises DCNv2's cross maps, dcnv2lr has none" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tiny / "data"), "--model", "dnn-se-1x", "--out", str(tmp_path / "t"),
                     "--pair-scales", *TINY]) == 2
    assert "--pair-scales: scales the field-pair maps of DCNv2's full-rank cross layer; dnn-se-1x has none" in (
        capsys.readouterr().err)
    assert cli_main([*base, "--backbones", "dcnv2", "--modes", "me-dr", "--scales", "1"]) == 2
    assert "needs at least 2 sets, not scale 1" in capsys.readouterr().err
