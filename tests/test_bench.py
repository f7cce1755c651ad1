"""The benchmark harness (``multiembed bench``): a smoke run on a tiny configuration whose JSON carries every
promised key with values checked against independent counts, the baseline's maths against the package's model,
and the analytic FLOP count against torch's counter. No timed assertions: speeds are only checked to be positive.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from multiembed.cli import main
from multiembed.cli.bench import load_harness
from multiembed.data.presets import preset
from multiembed.models import cpu_fastpath

K, BATCH, ROWS, HIDDEN, SET_DIM, STORED, LAYERS = 2, 32, 2000, 16, 10, 12, 4
# The step's phases (bench_train_phases), and those without GEMMs that the ceiling counts at their best.
PHASES = ("loader", "lookup_fwd", "lookup_bwd", "interaction_fwd", "interaction_bwd", "over_arch", "optimizer",
          "communication", "other")
NON_GEMM = ("loader", "lookup_fwd", "lookup_bwd", "optimizer", "communication")


@pytest.fixture(scope="module")
def harness():
    return load_harness()


def independent_vocab(rows_per_set: int):
    sizes = preset("criteo-kaggle").vocab_sizes
    total = sum(sizes.values())
    return {f: max(1, round(v * rows_per_set / total)) for f, v in sizes.items()}


def dcnv2_dense_params(k: int, fields: int, d: int, hidden: int) -> int:
    width = fields * d
    cross = LAYERS * (width * width + width)
    projection = width * hidden + hidden + 2 * hidden  # Linear + BatchNorm affine
    head = hidden * hidden + hidden + 2 * hidden + hidden + 1
    return k * (cross + projection) + head


def dcnv2_flops(k: int, batch: int, width: int, hidden: int) -> int:
    def fwd_bwd(n: int, m: int) -> int:
        return 3 * 2 * batch * n * m

    return k * (LAYERS * fwd_bwd(width, width) + fwd_bwd(width, hidden)) + fwd_bwd(hidden, hidden) + fwd_bwd(hidden, 1)


def test_bench_smoke_json_has_every_key_and_consistent_values(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    status = main([
        "bench", "--model", f"dcnv2-me-{K}x", "--batch-size", str(BATCH), "--rows-per-set", str(ROWS),
        "--steps", "2", "--block-steps", "1", "--warmup-steps", "1", "--quick", "--hidden", str(HIDDEN),
        "--json", str(out), "--no-progress", "--no-compiled-baseline", "--memory", "--memory-rows", "1000,3000", "--memory-steps", "1",
        "--memory-variants", "rowwise_adagrad:fp16",
    ])
    assert status == 0
    record = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "| samples/s |" in printed and "| K |" in printed and "savvy baseline" in printed
    assert "| step efficiency" in printed and "Memory per table row" in printed

    for key in ("samples_per_s", "baseline_samples_per_s", "interaction_gflops", "gemm_gflops", "speedup_vs_baseline",
                "interaction_vs_gemm", "step_ms", "baseline_step_ms", "achieved_step_gflops",
                "savvy_baseline_samples_per_s", "savvy_baseline_step_ms", "speedup_vs_savvy_baseline",
                "step_efficiency", "baseline_step_efficiency", "savvy_baseline_step_efficiency"):
        assert isinstance(record[key], float) and math.isfinite(record[key]) and record[key] > 0, key
    assert record["samples_per_s"] == pytest.approx(BATCH / (record["step_ms"] / 1e3))
    assert record["baseline_samples_per_s"] == pytest.approx(BATCH / (record["baseline_step_ms"] / 1e3))
    assert record["savvy_baseline_samples_per_s"] == pytest.approx(BATCH / (record["savvy_baseline_step_ms"] / 1e3))
    assert record["savvy_compiled_baseline_samples_per_s"] is None  # --no-compiled-baseline
    # The GEMM limit: no GEMM measured in the run, the step's own on any backend included, was faster.
    limit = record["gemm_limit"]
    rates = [row["gflops"] for row in limit["rows"]]
    assert all(rate > 0 for rate in rates)
    assert all(record["gemm_limit_gflops"] >= rate for rate in rates)
    assert record["gemm_limit_gflops"] == limit["gflops"] == max(rates)
    backends = ["addmm"] + (["onednn"] if cpu_fastpath.working_onednn_linear(torch.float32) is not None else [])
    assert limit["dtypes"] == ["float32"] and limit["backends"] == {"float32": backends}
    timed = {(row["m"], row["k"], row["n"], row["backend"]) for row in limit["rows"] if row["dtype"] == "float32"}
    recorded = {(g["m"], g["k"], g["n"]) for g in record["step_gemms"]}
    # The step's GEMMs at the fast path's padded widths: the cross layers forward ([B, D'] x [D', D']) and their
    # weight gradient ([D', B] x [B, D']), the over arch's first Linear; and the square GEMM.
    padded = cpu_fastpath.gemm_width(len(independent_vocab(ROWS)) * SET_DIM)
    for shape in ((BATCH, padded, padded), (padded, BATCH, padded), (BATCH, HIDDEN, HIDDEN)):
        assert shape in recorded, shape
    for shape in recorded | {(2048, 2048, 2048)}:
        for backend in backends:
            assert (*shape, backend) in timed, (shape, backend)
    assert record["executed_gemm_flops_per_step"] >= record["flops_per_step"]
    assert record["executed_gemm_flops_per_step"] == sum(g["flops"] for g in record["step_gemms"])
    # Step efficiency: the step's GEMM FLOPs per second (median step) over the limit; the baselines compute the same
    # model, so the same FLOPs.
    for prefix, name in (("", "project"), ("baseline_", "baseline"), ("savvy_baseline_", "savvy")):
        step_s = statistics.median(record["blocks_ms_per_step"][name]) / 1e3
        assert record[prefix + "step_efficiency"] == pytest.approx(
            record["flops_per_step"] / step_s / (record["gemm_limit_gflops"] * 1e9))
    # The ceiling: the step's GEMM FLOPs at the limit plus its non-GEMM phases at their best step.
    ceiling, breakdown = record["ceiling"], record["breakdown"]
    assert ceiling["gemm_ms"] == pytest.approx(record["flops_per_step"] / (record["gemm_limit_gflops"] * 1e9) * 1e3)
    assert ceiling["non_gemm_ms"] == breakdown["non_gemm_best_ms"] > 0
    assert ceiling["non_gemm_ms"] <= sum(record["breakdown_ms"][p] for p in NON_GEMM) + 1e-9
    assert ceiling["ms"] == pytest.approx(ceiling["gemm_ms"] + ceiling["non_gemm_ms"])
    assert ceiling["step_share"] == pytest.approx(ceiling["ms"] / record["step_ms"])
    # The savvy baseline trains its tables with the package's optimizer (Adagrad on CPU) and learning rates.
    assert record["optimizers"]["sparse_optimizer"] == "adagrad"
    assert record["optimizers"]["sparse_lr"] == 0.05 and record["optimizers"]["lr"] == 1e-3
    conditions = record["conditions"]
    assert conditions["cpu"] and conditions["cpu_count"] >= 1
    assert conditions["cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())
    assert conditions["mkldnn_bf16_supported"] is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert set(conditions["gemm_backend"]) == {"float32", "bfloat16"}
    assert set(conditions["gemm_backend"].values()) <= {"onednn", "addmm"}

    vocab = independent_vocab(ROWS)
    fields, width = len(vocab), len(vocab) * SET_DIM
    assert (record["config"]["fields"], record["config"]["rows_per_set_actual"]) == (fields, sum(vocab.values()))
    assert record["flops_per_step"] == dcnv2_flops(K, BATCH, width, HIDDEN)
    assert record["set_arch"]["interaction_flops"] == K * (LAYERS * 6 * BATCH * width**2 + 6 * BATCH * width * HIDDEN)
    assert record["set_arch"]["gemm_shape"] == [BATCH, width, width]
    assert record["set_arch"]["per_set_loop_ms"] > 0 and record["set_arch"]["batched_vs_loop_speedup"] > 0

    sizes = record["bytes"]
    dense_bytes = 4 * dcnv2_dense_params(K, fields, SET_DIM, HIDDEN)
    assert sizes["embedding_param_bytes"] == 4 * sum(vocab.values()) * K * STORED
    assert sizes["dense_param_bytes"] == dense_bytes
    assert sizes["sparse_optimizer_state_bytes"] == sizes["embedding_param_bytes"]  # Adagrad: one sum per weight
    # Adam: two moments per weight plus a step counter per parameter tensor.
    assert 2 * dense_bytes <= sizes["dense_optimizer_state_bytes"] <= 2 * dense_bytes + 8 * 64
    base = record["baseline_bytes"]
    assert base["embedding_param_bytes"] == 4 * sum(vocab.values()) * K * SET_DIM
    assert base["dense_param_bytes"] == dense_bytes
    assert base["optimizer_state_bytes"] >= 2 * (base["embedding_param_bytes"] + dense_bytes)
    savvy = record["savvy_baseline_bytes"]
    assert (savvy["embedding_param_bytes"], savvy["dense_param_bytes"]) == (base["embedding_param_bytes"], dense_bytes)
    # Adagrad: one sum per table weight (SparseAdam would keep two moments), fused Adam: two per dense weight.
    assert savvy["embedding_param_bytes"] + 2 * dense_bytes <= savvy["optimizer_state_bytes"]
    assert savvy["optimizer_state_bytes"] <= savvy["embedding_param_bytes"] + 2 * dense_bytes + 8 * 64

    # The breakdown, measured inside real steps: every phase of the package's step took time, and the phases add
    # up to the instrumented steps' wall time; the baselines have no loader or communication.
    assert set(record["breakdown_ms"]) == set(PHASES)
    assert all(record["breakdown_ms"][p] > 0 for p in PHASES), record["breakdown_ms"]
    assert breakdown["steps"] == 2
    assert sum(record["breakdown_ms"].values()) == pytest.approx(breakdown["step_ms_instrumented"])
    assert breakdown["sum_vs_step"] == pytest.approx(breakdown["step_ms_instrumented"] / record["step_ms"])
    assert breakdown["time_ratio_vs_uninstrumented"] > 0
    for prefix in ("baseline_", "savvy_baseline_"):
        parts = record[prefix + "breakdown_ms"]
        assert set(parts) == set(PHASES)
        assert parts["loader"] == parts["communication"] == 0.0
        assert all(parts[p] > 0 for p in ("lookup_fwd", "lookup_bwd", "interaction_fwd", "interaction_bwd",
                                          "over_arch", "optimizer")), (prefix, parts)
        assert sum(parts.values()) == pytest.approx(record[prefix + "breakdown"]["step_ms_instrumented"])
    assert "savvy_compiled_baseline_breakdown_ms" not in record
    # Where the step's time goes: the terms add up to the instrumented step; every GEMM of the step was timed inside
    # real steps (the timer's FLOPs are the recorded step's) and charged to a dense arch's phase.
    limits = record["limits"]
    assert limits["sum_ms"] == pytest.approx(breakdown["step_ms_instrumented"])
    assert limits["terms_ms"]["gemm_useful_at_limit"] == pytest.approx(ceiling["gemm_ms"])
    assert limits["terms_ms"]["gemm_shapes"] >= -1e-9 and limits["terms_ms"]["gemm_padding"] >= 0
    phases = limits["phases"]
    timed_flops = sum(phases[p]["gemm_gflop"] for p in PHASES) * 1e9
    assert timed_flops == pytest.approx(record["executed_gemm_flops_per_step"])
    assert all(phases[p]["gemm_ms"] > 0 for p in ("interaction_fwd", "interaction_bwd", "over_arch"))
    assert all(phases[p]["gemm_ms"] == 0 for p in NON_GEMM)
    assert 0 < limits["share_without_dense_non_gemm"] <= 1
    assert "Step split (ms)" in printed
    assert set(record["layouts"]) == {"fused", "per_set"}
    assert all(row["samples_per_s"] > 0 for row in record["layouts"].values())

    assert [row["num_sets"] for row in record["scaling_k"]] == [1, 2]
    for row in record["scaling_k"]:
        expected = dcnv2_flops(row["num_sets"], BATCH, width, HIDDEN)
        assert row["gflop_per_step"] * 1e9 == pytest.approx(expected)
        assert row["flops_ratio"] == pytest.approx(expected / dcnv2_flops(1, BATCH, width, HIDDEN))
        assert row["step_ms"] > 0
    assert [row["batch_size"] for row in record["scaling_batch"]] == [BATCH // 2, BATCH]
    assert record["memory"]["peak_rss_bytes"] >= record["memory"]["peak_rss_after_project_bytes"] > 0
    assert record["memory"]["baseline_process_peak_rss_bytes"] > 0
    assert record["memory"]["savvy_baseline_process_peak_rss_bytes"] > 0
    assert record["conditions"]["command"].startswith("multiembed bench --model dcnv2-me-2x")
    assert record["conditions"]["malloc"] == "train"  # the default: as multiembed train sets it
    assert set(record["page_fault_mb_per_step"]) == {"project", "baseline", "savvy"}
    assert set(record["blocks_ms_per_step"]) == {"project", "baseline", "savvy"}

    # --memory: each contender probed in fresh processes at both sizes, a line through the points.
    memory = record["memory_per_row"]
    assert memory["rows_per_set"] == [1000, 3000] and memory["budget_gib"] == 24.0
    assert set(memory["contenders"]) == {"savvy", "project rowwise_adagrad fp16"}
    for row in memory["contenders"].values():
        assert [p["rows_per_set"] for p in row["points"]] == [1000, 3000]
        assert all(p["peak_rss_bytes"] >= p["peak_rss_after_build_bytes"] > 0 for p in row["points"])
        first, last = row["points"]
        assert row["bytes_per_row"] == pytest.approx(
            (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / (last["rows_per_set_actual"] - first["rows_per_set_actual"])
        )
        assert row["bytes_per_set_row"] == pytest.approx(row["bytes_per_row"] / K)
        assert row["assumes"]
    assert "no fp32 master copy" in memory["contenders"]["project rowwise_adagrad fp16"]["assumes"]
    assert memory["contenders"]["project rowwise_adagrad fp16"]["points"][0]["table_bytes"] == 2 * sum(
        independent_vocab(1000).values()) * K * STORED
    assert all(v >= 0 for v in record["page_fault_mb_per_step"].values())
    assert all(row["page_fault_mb_per_step"] >= 0 for row in record["layouts"].values())
    assert record["layouts"]["per_set"]["time_ratio_vs_fused"] > 0


def test_bytes_per_row_is_the_slope_and_the_budget_gives_the_largest_table() -> None:
    from multiembed.benchmarks.bench_memory import bytes_per_row

    points = [{"rows_per_set_actual": r, "peak_rss_bytes": 500_000_000 + 200 * r} for r in (1_000_000, 4_000_000)]
    fit = bytes_per_row(points, 2**30)
    assert fit["bytes_per_row"] == pytest.approx(200.0) and fit["fixed_bytes"] == pytest.approx(5e8)
    assert fit["max_rows_per_set"] == (2**30 - 500_000_000) // 200
    with pytest.raises(ValueError, match="two or more different"):
        bytes_per_row(points[:1], 2**30)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
def test_bench_bf16_reports_the_speedup_over_fp32(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main([
        "bench", "--model", "dcnv2-me-2x", "--batch-size", str(BATCH), "--rows-per-set", str(ROWS), "--steps", "2",
        "--block-steps", "1", "--warmup-steps", "1", "--quick", "--hidden", str(HIDDEN), "--json", str(out),
        "--no-progress", "--no-baseline", "--no-scaling", "--no-layout-comparison", "--precision", "bf16",
        "--table-dtype", "fp16",
    ]) == 0
    record = json.loads(out.read_text())
    assert (record["config"]["precision"], record["config"]["table_dtype"]) == ("bf16", "fp16")
    rows = record["precisions"]
    assert rows["bf16"]["samples_per_s"] > 0 and rows["fp32"]["samples_per_s"] > 0 and rows["bf16_speedup"] > 0
    assert record["set_arch"]["gemm_gflops_bf16"] > 0
    assert record["bytes"]["embedding_param_bytes"] == 2 * sum(independent_vocab(ROWS).values()) * 2 * STORED
    assert "bf16 / fp32 samples/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "dnn-me-2x", "--baseline"], "implements the paper's ME-DCNv2 only"),
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--model", "dcnv2-xx-2x"], "unknown model name"),
    ],
)
def test_bench_refuses_bad_options_with_one_line(tmp_path: Path, capsys, argv, message) -> None:
    status = main(["bench", "--json", str(tmp_path / "x.json"), "--no-progress", *argv])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("multiembed bench: error:") and message in err
    assert not (tmp_path / "x.json").exists()


def test_baseline_process_reports_the_childs_error(harness) -> None:
    """The baseline runs in a child process (its own malloc heap); a failure there surfaces here with its cause."""
    spec = harness.BaselineSpec(
        model_name="dcnv2-me-2x", vocab_sizes={}, batch_size=4, batch_pool=1, seed=0, id_exponent=1.0, device="cpu",
        hidden=8, dropout=0.0, model_seed=0, threads=1, malloc="default", kind="savvy",
    )
    with pytest.raises(RuntimeError, match="the baseline process failed") as info:
        harness.BaselineProcess(spec)
    assert "field_dims must be non-empty" in str(info.value)


def test_paper_baseline_computes_the_same_model(harness) -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from multiembed.benchmarks import paper_baseline as baseline_module
    from multiembed.models import build_model
    from multiembed.models.layers import UniformMaskDropout

    torch.manual_seed(0)
    vocab = {"a": 13, "b": 7, "c": 21}
    model = build_model("dcnv2-me-4x", vocab, device=torch.device("cpu"), hidden=16)
    baseline = baseline_module.PaperMultiDCNv2(list(vocab.values()), 4, 10, hidden=16)
    # Running statistics that are not the defaults, so eval mode checks that they are carried over.
    with torch.no_grad():
        model.set_arch.projection.norm.batch_norm.running_mean.uniform_(-1, 1)
        model.set_arch.projection.norm.batch_norm.running_var.uniform_(0.5, 2)
    baseline_module.copy_weights_from(baseline, model)
    ids = torch.stack([torch.randint(0, v, (32,)) for v in vocab.values()], dim=1)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=list(vocab), values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )
    model.eval(), baseline.eval()
    torch.testing.assert_close(baseline(ids), model(torch.empty(32, 0), features), rtol=1e-5, atol=1e-6)
    for module in (*model.modules(), *baseline.modules()):
        if isinstance(module, (torch.nn.Dropout, UniformMaskDropout)):
            module.p = 0.0
    model.train(), baseline.train()
    torch.testing.assert_close(baseline(ids), model(torch.empty(32, 0), features), rtol=1e-5, atol=1e-6)
    # A different weight must show: the comparison is not vacuous.
    with torch.no_grad():
        baseline.cns[1][0].W[0].add_(0.1)
    assert not torch.allclose(baseline(ids), model(torch.empty(32, 0), features), atol=1e-4)


@pytest.mark.parametrize("name", ["dcnv2-me-3x", "dcnv2lr-me-2x"])
def test_analytic_set_arch_flops_match_torch_flop_counter(harness, name: str) -> None:
    from multiembed.models import build_set_arch, parse_model_name

    arch = build_set_arch(parse_model_name(name), num_fields=5, hidden=24, **({"cross_rank": 8} if "lr" in name else {}))
    from multiembed.benchmarks.bench_train_flops import counted_flops, set_arch_flops

    counted = counted_flops(arch, (16, arch.num_sets, 5, arch.set_dim))
    assert set_arch_flops(arch, 16) == counted > 0


def test_scaled_vocab_keeps_criteo_proportions(harness) -> None:
    sizes = harness.scaled_vocab_sizes(1_100_000)
    full = preset("criteo-kaggle").vocab_sizes
    assert list(sizes) == list(full) and len(sizes) == 39
    assert abs(sum(sizes.values()) - 1_100_000) <= len(sizes)
    scale = 1_100_000 / sum(full.values())
    for field in ("C3", "C12", "I1"):
        assert sizes[field] == round(full[field] * scale)
    assert min(harness.scaled_vocab_sizes(50).values()) == 1


def test_gpu_check_runs_in_a_fresh_process(tmp_path: Path) -> None:
    """The prepared GPU script, in a fresh process as on the GPU machine, imported as a module of the package:
    one-rank all-reduce correct, FLOPs as the harness counts."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    code = (
        "import runpy, sys; sys.argv = ['gpu_check', '--device', 'cpu', '--quick', '--json', sys.argv[1]]; "
        "runpy.run_module('multiembed.benchmarks.gpu_check', run_name='__main__')"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=repo, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    assert record["collective"]["all_reduce_correct"] is True and record["collective"]["backend"] == "gloo"
    (row,) = record["interaction"]
    assert (row["batch"], row["num_sets"], row["width"]) == (64, 4, 60)
    assert row["interaction_ms"] > 0 and row["gemm_gflops"] > 0 and row["interaction_vs_gemm"] > 0
    flops = 4 * (4 * 6 * 64 * 60 * 60 + 6 * 64 * 60 * 32)
    assert row["interaction_gflops"] == pytest.approx(flops / (row["interaction_ms"] / 1e3) / 1e9)


@pytest.mark.parametrize("num_sets, groups, width", [(4, 4, 6), (4, 2, 8), (3, 1, 13)])
def test_cpu_fast_paths_have_exact_gradients(num_sets: int, groups: int, width: int) -> None:
    """The performance work's CPU paths (one GEMM per set at padded widths, written-out backward) against finite
    differences in float64, with and without padding (8 is already a multiple of 8) and with shared weights."""
    from multiembed.models.interactions import cross_network
    from multiembed.models.layers import per_set_linear

    torch.manual_seed(0)
    f64 = {"dtype": torch.float64, "requires_grad": True}
    x = torch.randn(num_sets, 3, width, **f64)
    weight, bias = torch.randn(groups, 5, width, **f64), torch.randn(groups, 5, **f64)
    assert torch.autograd.gradcheck(per_set_linear, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x, w: per_set_linear(x, w, None), (x, weight))
    per = num_sets // groups
    expected = torch.baddbmm(bias.repeat_interleave(per, 0).unsqueeze(1), x, weight.repeat_interleave(per, 0).mT)
    torch.testing.assert_close(per_set_linear(x, weight, bias), expected)

    layers = 3
    x0 = torch.randn(groups, 4, width, **f64)
    weights = [(0.3 * torch.randn(groups, width, width, dtype=torch.float64)).requires_grad_() for _ in range(layers)]
    biases = [torch.randn(groups, width, **f64) for _ in range(layers)]

    def cross(x0, *params):
        return cross_network(x0, list(params[:layers]), list(params[layers:]))

    assert torch.autograd.gradcheck(cross, (x0, *weights, *biases))
    xl = x0
    for w, b in zip(weights, biases):
        xl = x0 * (torch.bmm(xl, w.mT) + b.unsqueeze(1)) + xl
    torch.testing.assert_close(cross(x0, *weights, *biases), xl)


def test_savvy_baseline_trains_the_same_model_as_the_paper_style_one(harness) -> None:
    """Sparse gradients + SparseAdam + fused dense Adam take the steps dense Adam takes, on the same weights and
    batches, when every row has a gradient every step (dense Adam moves rows without one by their momentum) and
    without weight decay (SparseAdam has none)."""
    from multiembed.benchmarks import paper_baseline as module
    field_dims, ids_shape = [13, 7, 21], (32, 3)
    torch.manual_seed(0)
    paper = module.PaperMultiDCNv2(field_dims, 2, 10, hidden=16, dropout=0.0)
    savvy = module.PaperMultiDCNv2(field_dims, 2, 10, hidden=16, dropout=0.0, sparse=True)
    savvy.load_state_dict(paper.state_dict())
    paper_step = module.PaperTrainStep(paper, weight_decay=0.0)
    savvy_step = module.SavvyTrainStep(savvy, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        # Every row of every field in each batch (each field has <= 32 rows).
        ids = torch.stack([torch.randperm(d, generator=generator).repeat(ids_shape[0] // d + 1)[: ids_shape[0]]
                           for d in field_dims], dim=1)
        labels = (torch.rand(ids_shape[0], generator=generator) < 0.3).float()
        assert savvy_step(ids, labels) == pytest.approx(paper_step(ids, labels), rel=1e-5)
    # Adam's step is about lr = 1e-3 per weight whatever the gradient's size, so a gradient summed in another order
    # (sparse coalescing vs dense accumulation) can move a weight whose gradient is near 0 by a fraction of lr:
    # tolerance a tenth of one step. A Linear bias right before train-mode BatchNorm has an exact gradient of 0 (the
    # normalisation removes it), so Adam turns rounding noise into full steps there: those biases are left out.
    before_norm = {
        f"{name}.{i}.bias"
        for name, module in paper.named_modules() if isinstance(module, torch.nn.Sequential)
        for i in range(len(module) - 1)
        if isinstance(module[i], torch.nn.Linear) and isinstance(module[i + 1], torch.nn.BatchNorm1d)
    }
    assert len(before_norm) == 3  # one per set's projection, one in the head
    for (name, want), got in zip(paper.state_dict().items(), savvy.state_dict().values()):
        if name not in before_norm:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert savvy.embeddings[0].embedding.weight.grad is None or savvy.embeddings[0].embedding.weight.grad.is_sparse
    with pytest.raises(ValueError, match="sparse=True"):
        module.SavvyTrainStep(paper)


def test_dropout_mask_bench_smoke_and_every_contender_is_a_dropout_mask(tmp_path: Path, capsys) -> None:
    from multiembed.benchmarks import bench_dropout_mask

    out = tmp_path / "mask.json"
    assert bench_dropout_mask.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["masks"]) == {"256x1600", "256x400"}
    for rows in [*result["masks"].values(), result["dense_step"]]:
        assert rows["fast_path"]["ratio_to_fast_path"] == 1.0
        assert all(row["ms"] > 0 for row in rows.values())
    assert set(result["masks"]["256x400"]) == set(bench_dropout_mask.MASKS)
    assert "cpu_capability" in result["machine"]
    assert "| dcnv2-me-4x dense step | fast_path |" in capsys.readouterr().out
    # Every contender keeps each element with probability 1 - p (6 sigma) and follows the seed.
    x = torch.empty(500, 400)
    for name, mask in bench_dropout_mask.MASKS.items():
        torch.manual_seed(4)
        kept = mask(x, 0.2)
        assert kept.shape == x.shape and set(kept.unique().tolist()) == {0, 1}, name  # bool, or 0.0 / 1.0
        assert abs(float(kept.double().mean()) - 0.8) < 6 * math.sqrt(0.16 / x.numel()), name


def test_gemm_recorder_sees_every_product_of_a_step_with_its_layout() -> None:
    """A Linear layer's step: the forward addmm with the weight read transposed, and the backward's input gradient
    ``dY W`` and weight gradient ``dY^T x`` (its left operand a transposed view)."""
    from multiembed.benchmarks.bench_train_yardstick import GemmRecorder, GemmShape

    layer = torch.nn.Linear(3, 5)
    x = torch.randn(8, 3, requires_grad=True)
    with GemmRecorder() as recorder:
        layer(x).backward(torch.randn(8, 5))
    assert dict(recorder.gemms) == {
        GemmShape(8, 3, 5, b_transposed=True): 1,
        GemmShape(8, 5, 3): 1,
        GemmShape(5, 8, 3, a_transposed=True): 1,
    }
    with GemmRecorder() as recorder:
        torch.bmm(torch.randn(4, 8, 3), torch.randn(4, 3, 5).transpose(1, 2).contiguous().transpose(1, 2))
        torch.zeros(8, 5).addmm_(torch.randn(8, 3), torch.randn(3, 5))  # in place, as the cross network's backward
    assert dict(recorder.gemms) == {GemmShape(8, 3, 5, batch=4, b_transposed=True): 1, GemmShape(8, 3, 5): 1}


def test_gemm_limit_refuses_a_yardstick_slower_than_a_gemm_the_step_runs() -> None:
    """The limit is the fastest of every GEMM timed (the step's shapes and the square, on every backend); a record
    whose limit is below one of them, or that left a GEMM of the step untimed, is refused."""
    from multiembed.benchmarks.bench_train_yardstick import (
        SQUARE_GEMM,
        GemmShape,
        GemmYardstick,
        check_gemm_limit,
        step_gemm_rows,
    )

    step = {GemmShape(64, 40, 24, b_transposed=True): 3, GemmShape(40, 64, 24, a_transposed=True): 1,
            GemmShape(64, 24, 16, batch=3): 2}
    yardstick = GemmYardstick(step, "fp32", torch.device("cpu"))
    yardstick.run_round()
    limit = yardstick.result()
    rows = step_gemm_rows(step)
    check_gemm_limit(limit, rows)
    backends = ["addmm"] + (["onednn"] if cpu_fastpath.working_onednn_linear(torch.float32) is not None else [])
    assert limit["backends"] == {"float32": backends}
    timed = {(row["m"], row["k"], row["n"], row["backend"]) for row in limit["rows"]}
    for m, k, n in [(64, 40, 24), (40, 64, 24), (64, 24, 16), (SQUARE_GEMM,) * 3]:
        assert all((m, k, n, backend) in timed for backend in backends)
    assert (64, 24, 16, "bmm") in timed  # the batched call on torch's batched kernel too
    assert limit["gflops"] == max(row["gflops"] for row in limit["rows"]) > 0
    assert sum(row["calls_in_step"] for row in limit["rows"] if row["backend"] == "addmm") == 6

    slowest_step_gemm = min(row["gflops"] for row in limit["rows"] if row["source"] == "step")
    with pytest.raises(ValueError, match="is below the measured"):
        check_gemm_limit({**limit, "gflops": slowest_step_gemm * 0.99}, rows)
    partial = GemmYardstick({shape: calls for shape, calls in step.items() if shape.m != 40}, "fp32",
                            torch.device("cpu"))
    partial.run_round()
    with pytest.raises(ValueError, match=r"\[40, 64\] x \[64, 24\] in float32 on addmm was not timed"):
        check_gemm_limit(partial.result(), rows)


def test_ceiling_is_the_gemm_flops_at_the_limit_plus_the_best_non_gemm_work() -> None:
    from multiembed.benchmarks.bench_train_phases import summarize
    from multiembed.benchmarks.bench_train_yardstick import ceiling

    steps = [dict.fromkeys(PHASES, 0.01), {**dict.fromkeys(PHASES, 0.01), "lookup_bwd": 0.002, "over_arch": 0.05}]
    summary = summarize(steps, step_ms=100.0)
    assert summary["ms"]["lookup_bwd"] == pytest.approx(6.0) and summary["ms"]["over_arch"] == pytest.approx(30.0)
    assert summary["step_ms_instrumented"] == pytest.approx(sum(summary["ms"].values()))
    assert summary["step_ms_instrumented"] == pytest.approx(106.0)
    assert summary["sum_vs_step"] == pytest.approx(1.06) and summary["within_5_percent"] is False
    assert summarize(steps, step_ms=104.0)["within_5_percent"] is True
    assert summary["non_gemm_best_ms"] == pytest.approx(42.0)  # the second step: 4 x 10 ms + 2 ms
    result = ceiling(flops=3e9, limit_gflops=150.0, non_gemm_ms=summary["non_gemm_best_ms"], step_ms=100.0)
    assert result["gemm_ms"] == pytest.approx(20.0) and result["ms"] == pytest.approx(62.0)
    assert result["step_share"] == pytest.approx(0.62)


def test_step_limits_split_the_step_between_the_gemm_limit_and_the_rest() -> None:
    """A step of 40 ms: GEMMs charged to the dense phases (18 ms as run, 12 ms at their best shapes, 8 GFLOP executed
    of which 6 useful at a 1000 GFLOP/s limit); the terms add up to the phases, and the phase rows carry the GEMMs."""
    from multiembed.benchmarks.bench_train_yardstick import GemmTimer, step_limits

    breakdown = {**dict.fromkeys(PHASES, 1.0), "interaction_fwd": 10.0, "interaction_bwd": 16.0, "over_arch": 7.0}
    gemm_ms = {"interaction_fwd": 6.0, "interaction_bwd": 10.0, "over_arch": 2.0}
    gemm_flops = {"interaction_fwd": 2.5e9, "interaction_bwd": 5e9, "over_arch": 0.5e9}
    limits = step_limits(breakdown, gemm_ms, gemm_flops, useful_flops=6e9, executed_flops=8e9, step_best_ms=12.0,
                         limit_gflops=1000.0, step_ms=40.0)
    assert limits["terms_ms"] == pytest.approx({
        "gemm_useful_at_limit": 6.0, "gemm_padding": 2.0, "gemm_shapes": 4.0, "gemm_in_step": 6.0,
        "dense_non_gemm": 15.0, "non_gemm_phases": 6.0,
    })
    assert limits["sum_ms"] == pytest.approx(sum(breakdown.values())) and limits["sum_vs_step"] == pytest.approx(0.975)
    assert limits["phases"]["interaction_bwd"] == pytest.approx(
        {"ms": 16.0, "gemm_ms": 10.0, "gemm_gflop": 5.0, "gemm_gflops": 500.0, "non_gemm_ms": 6.0})
    assert limits["gemm_in_step_gflops"] == pytest.approx(8e9 / 18e-3 / 1e9)
    assert limits["share_without_dense_non_gemm"] == pytest.approx(6.0 / 24.0)
    with pytest.raises(ValueError, match="phases the breakdown lacks: lookup"):
        step_limits(breakdown, {"lookup": 1.0}, {}, 1.0, 1.0, 1.0, 1.0, 1.0)

    # The timer charges each product to the phase current at its call, forward and backward.
    phase = ["interaction_fwd"]
    timer = GemmTimer(torch.device("cpu"), phase=lambda: phase[0])
    layer, x = torch.nn.Linear(3, 5), torch.randn(8, 3, requires_grad=True)
    with timer:
        out = layer(x)
        phase[0] = "interaction_bwd"
        out.backward(torch.randn(8, 5))
    assert timer.flops == {"interaction_fwd": 2 * 8 * 3 * 5, "interaction_bwd": 2 * 2 * 8 * 3 * 5}
    assert set(timer.seconds) == {"interaction_fwd", "interaction_bwd"} and min(timer.seconds.values()) > 0


@pytest.mark.parametrize("name, expected", [("adagrad", torch.optim.Adagrad), ("adam", torch.optim.SparseAdam),
                                            ("sgd", torch.optim.SGD)])
def test_savvy_baseline_uses_the_packages_table_optimizer_and_rates(name: str, expected: type) -> None:
    from multiembed.benchmarks.bench_train_baseline import BaselineRunner

    runner = BaselineRunner("dcnv2-me-2x", {"a": 13, "b": 7}, torch.device("cpu"), hidden=8, kind="savvy",
                                    table_optimizer=name, table_lr=0.05, lr=2e-3, weight_decay=0.0)
    tables, dense = runner.step.sparse_optimizer, runner.step.optimizer
    assert type(tables) is expected and tables.param_groups[0]["lr"] == 0.05
    assert dense.param_groups[0]["lr"] == 2e-3 and dense.param_groups[0]["weight_decay"] == 0.0
    assert len(tables.param_groups[0]["params"]) == 2  # one table per set
    ids = torch.stack([torch.randint(0, 7, (16,)), torch.randint(0, 7, (16,))], dim=1)
    assert runner.step(ids, torch.ones(16)) > 0
    with pytest.raises(ValueError, match="no plain-PyTorch table optimizer 'rowwise_adagrad'"):
        BaselineRunner("dcnv2-me-2x", {"a": 13}, torch.device("cpu"), hidden=8, kind="savvy",
                               table_optimizer="rowwise_adagrad")


@pytest.mark.slow
def test_compiled_savvy_baseline_trains_as_the_eager_one(harness) -> None:
    """The savvy step with its dense part under torch.compile takes the eager step's steps (same weights, batches,
    table optimizer)."""
    from multiembed.benchmarks.bench_train_baseline import BaselineRunner

    vocab = {"a": 13, "b": 7, "c": 21}
    common = dict(hidden=16, dropout=0.0, seed=0, table_optimizer="adagrad", table_lr=0.05)
    eager = BaselineRunner("dcnv2-me-2x", vocab, torch.device("cpu"), kind="savvy", **common)
    compiled = BaselineRunner("dcnv2-me-2x", vocab, torch.device("cpu"), kind="savvy_compiled", **common)
    batches = harness.make_batches(vocab, 32, 2, 1, 1.0, torch.device("cpu"))
    # Losses only: Adam and Adagrad turn the rounding noise of a near-zero gradient (another summation order under
    # the compiler) into full steps of some weights, so the weights agree only loosely.
    for batch in batches * 2:
        want = eager.step(batch.ids, batch.batch.labels)
        assert compiled.step(batch.ids, batch.batch.labels) == pytest.approx(want, rel=1e-3)
    assert compiled.run(batches, 2) > 0
    with pytest.raises(ValueError, match="not timed phase by phase"):
        compiled.run(batches, 1, phases=[])
