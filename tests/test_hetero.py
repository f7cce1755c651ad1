"""Heterogeneous multi-embedding (``hetero-me-{K}x``): experts per set, batched by kind, the learned gate, and the
model through the trainer, sharding, analysis and the scaling study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_models_batched import REFERENCES, set_major_embeddings
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.cli import main as cli_main
from multiembed.config import TrainConfig
from multiembed.models import (
    HeteroSetArch,
    SetGate,
    build_model,
    build_set_arch,
    expert_groups,
    parse_experts,
    parse_model_name,
    set_experts,
)

B, FIELDS, HIDDEN = 16, 4, 8
VOCAB = {"a": 40, "b": 30, "c": 3}
VOCAB_COLLAPSE = 8  # fields of `synth --regime collapse`


def test_experts_are_cycled_and_grouped_by_kind() -> None:
    assert set_experts(("dcnv2", "ipnn", "nfwfm", "dnn"), 6) == ["dcnv2", "dcnv2", "ipnn", "ipnn", "nfwfm", "dnn"]
    assert expert_groups(("dcnv2", "ipnn"), 1) == [("dcnv2", 1)]
    assert expert_groups("dnn,dcnv2,dnn", 4) == [("dnn", 3), ("dcnv2", 1)]
    assert parse_experts(" DCNv2 , ipnn ") == ("dcnv2", "ipnn")
    for bad, words in (("", "at least one"), ("dcnv2,xdeepfm", "xdeepfm cannot be"), ("finalmlp", "finalmlp")):
        with pytest.raises(ValueError, match=words):
            parse_experts(bad)
    spec = parse_model_name("hetero-me-4x")
    assert (spec.num_sets, spec.set_dim, spec.heterogeneous, spec.name) == (4, 10, True, "hetero-me-4x")
    for name in ("hetero-se-4x", "hetero-mesi-2x"):
        with pytest.raises(ValueError, match="multi-embedding only"):
            parse_model_name(name)
    assert not parse_model_name("dcnv2-me-4x").heterogeneous


def test_config_default_experts_are_the_models() -> None:
    from multiembed.models import DEFAULT_EXPERTS

    default = TrainConfig(data="", model="", out="")
    assert tuple(default.experts.split(",")) == DEFAULT_EXPERTS and default.combiner == "mean"


@pytest.mark.parametrize("experts, num_sets", [(("dcnv2", "ipnn", "nfwfm", "dnn"), 6), (("dnn", "dcnv2lr"), 3)])
def test_hetero_arch_equals_each_sets_own_expert_in_a_loop(experts, num_sets) -> None:
    """Set m's output is its expert's (the paper-style per-set reference of that backbone), forward and gradients:
    the batching by kind and the slicing of the sets never mix sets or experts."""
    torch.manual_seed(num_sets)
    spec = parse_model_name(f"hetero-me-{num_sets}x4")
    arch = build_set_arch(spec, FIELDS, hidden=HIDDEN, dropout=0.0, experts=experts, **{})
    assert isinstance(arch, HeteroSetArch) and arch.set_kinds == set_experts(experts, num_sets)
    with torch.no_grad():
        for p in arch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    arch.train()
    leaf = set_major_embeddings(num_sets, FIELDS, 4).detach().requires_grad_(True)
    batched = arch(leaf)
    assert batched.shape == (B, num_sets, HIDDEN)
    rows, m = [], 0
    for kind, expert in zip(arch.kinds, arch.experts):
        for j in range(expert.num_sets):
            rows.append(REFERENCES[kind](expert, j, leaf[:, m]))
            m += 1
    reference = torch.stack(rows, dim=1)
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-5)
    params = list(arch.parameters())
    probe = torch.randn_like(reference)
    grads = torch.autograd.grad((batched * probe).sum(), [leaf] + params)
    ref_grads = torch.autograd.grad((reference * probe).sum(), [leaf] + params)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def kjt(batch: int, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, n, (batch,), generator=g) for n in VOCAB.values()])
    return KeyedJaggedTensor.from_lengths_sync(keys=list(VOCAB), values=values,
                                               lengths=torch.ones(batch * len(VOCAB), dtype=torch.long))


def test_hetero_1x_is_se_of_the_first_expert() -> None:
    torch.manual_seed(0)
    hetero = build_model("hetero-me-1x", VOCAB, device=torch.device("cpu"), hidden=HIDDEN, experts=("dcnv2", "dnn"))
    se = build_model("dcnv2-se-1x", VOCAB, device=torch.device("cpu"), hidden=HIDDEN)
    state = {k.replace("set_arch.experts.0.", "set_arch."): v for k, v in hetero.state_dict().items()}
    se.load_state_dict(state)
    hetero.eval(), se.eval()
    features = kjt(8)
    torch.testing.assert_close(hetero(torch.empty(8, 0), features), se(torch.empty(8, 0), features))


def test_gate_starts_as_the_mean_learns_and_checks_its_shapes() -> None:
    torch.manual_seed(1)
    gated = build_model("hetero-me-3x", VOCAB, device=torch.device("cpu"), hidden=HIDDEN, combiner="gate",
                        experts=("dcnv2", "ipnn"), dropout=0.0)
    plain = build_model("hetero-me-3x", VOCAB, device=torch.device("cpu"), hidden=HIDDEN, experts=("dcnv2", "ipnn"),
                        dropout=0.0)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("set_gate.")})
    gated.eval(), plain.eval()
    features = kjt(8, seed=1)
    torch.testing.assert_close(gated(torch.empty(8, 0), features), plain(torch.empty(8, 0), features))
    assert gated.dense_params == plain.dense_params + (len(VOCAB) * 10 + 1) * 3

    # The gate's weights are a softmax over the sets of the mean pooled embedding, and they receive gradients.
    gated.train()
    logits, embeddings = gated.forward_with_embeddings(torch.empty(8, 0), features)
    logits.sum().backward()
    assert gated.set_gate.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        gated.set_gate.linear.weight.normal_()
        weights = gated.set_gate.weights(embeddings)
        expected = torch.softmax(embeddings.mean(dim=1).flatten(1) @ gated.set_gate.linear.weight.T
                                 + gated.set_gate.linear.bias, dim=-1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(8))
    per_set = torch.randn(8, 3, HIDDEN)
    torch.testing.assert_close(gated.set_gate(per_set, embeddings), (weights.unsqueeze(2) * per_set).sum(dim=1))

    with pytest.raises(ValueError, match="set_gate num_sets is 2, expected 3"):
        type(gated)(gated.sparse_arch, gated.set_arch, gated.over_arch, set_gate=SetGate(2, 3, 10))
    with pytest.raises(ValueError, match="combiner: unknown 'max'"):
        build_model("dcnv2-me-2x", VOCAB, device=torch.device("cpu"), combiner="max")
    with pytest.raises(ValueError, match="output_dim is 5, expected 8"):
        HeteroSetArch(("dnn", "dcnv2"), [build_set_arch(parse_model_name("dnn-me-1x"), 3, hidden=8),
                                          build_set_arch(parse_model_name("dcnv2-me-1x"), 3, hidden=5)])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hetero") / "data"
    assert cli_main(["synth", "--regime", "collapse", "--rows", "4000", "--out", str(out), "--no-progress"]) == 0
    return out


def test_hetero_trains_shards_evaluates_and_reports_ia_per_set(tiny_data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train = ["train", "--data", str(tiny_data), "--model", "hetero-me-3x", "--experts", "dcnv2,ipnn,dnn",
             "--combiner", "gate", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--max-steps", "6",
             "--eval-every", "3", "--hidden", "16", "--device", "cpu", "--no-progress"]
    assert cli_main(train) == 0
    capsys.readouterr()
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["experts"] == "dcnv2,ipnn,dnn" and options["combiner"] == "gate"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics[-1]["ia_mean"]) == len(metrics[-1]["ia_min"]) == 3  # IA logged per set

    # evaluate and analyze rebuild the hetero model (experts, gate) from config.json alone.
    assert cli_main(["evaluate", str(run), "--data", str(tiny_data)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert evaluated["test_auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    assert cli_main(["analyze", str(run), "--out", str(tmp_path / "report"), "--no-sub-embedding"]) == 0
    collapse = json.loads((tmp_path / "report" / "collapse.json").read_text())
    assert len(collapse["sets"]) == 3 and set(collapse["concat"]) == set(collapse["sets"][0])

    # Resuming with other experts is refused; --experts on a homogeneous model too.
    assert cli_main([*train[:6], "dcnv2,dnn", *train[7:], "--resume"]) == 2
    assert "--experts is 'dcnv2,dnn' but the run" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tiny_data), "--model", "dcnv2-me-2x", "--experts", "dnn", "--out",
                     str(tmp_path / "x"), "--device", "cpu", "--no-progress"]) == 2
    assert "--experts: only hetero-me-{K}x models take experts, not dcnv2-me-2x" in capsys.readouterr().err


def test_hetero_plans_set_parallel_like_homogeneous_me(tiny_data: Path, capsys) -> None:
    """The sparse arch is homogeneous ME's: the same tables, sharded the same way (sets on different ranks)."""
    common = ["plan", "--data", str(tiny_data), "--world-size", "2", "--local-world-size", "2", "--hbm-gb", "1",
              "--strategy", "column_wise"]
    assert cli_main([*common, "--model", "hetero-me-4x"]) == 0
    hetero = capsys.readouterr().out
    assert cli_main([*common, "--model", "dcnv2-me-4x"]) == 0
    homogeneous = capsys.readouterr().out
    def table_lines(report: str):
        return [line for line in report.splitlines() if "column_wise  fused" in line]

    assert len(table_lines(hetero)) == VOCAB_COLLAPSE and table_lines(hetero) == table_lines(homogeneous)
    assert all(" 0,1,0,1 " in line for line in table_lines(hetero))  # the 4 sets over both ranks
