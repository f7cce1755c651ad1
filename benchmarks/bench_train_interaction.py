"""The interaction measurement: the batched set interaction arch against fp32 GEMMs of its shape and against the
baseline's per-set Python loop, timed alternately in one run."""

from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Optional

import torch

from multiembed.benchmarks import paper_baseline
from multiembed.benchmarks.bench_train_flops import counted_flops, set_arch_flops
from multiembed.benchmarks.bench_train_project import ProjectRunner
from multiembed.benchmarks.bench_train_timing import paired_ratio, timed
from multiembed.benchmarks.bench_train_workload import BenchConfig
from multiembed.models.precision import dense_autocast


def set_arch_per_set_loop(
    config: BenchConfig, project: ProjectRunner
) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The baseline's per-set branches (cross + projection per set, :mod:`paper_baseline`) as a loop over sets, for
    ``[B, K, F, d]`` input (None without a baseline). Built here (the timed baseline lives in its own process)."""
    if not config.with_baseline:
        return None
    arch = project.inner.set_arch
    shape_only = paper_baseline.PaperMultiDCNv2(
        [1] * arch.num_fields, arch.num_sets, arch.set_dim, hidden=config.hidden, dropout=config.dropout
    ).to(project.device)
    branches = shape_only.cns
    d_in = shape_only.input_dim

    def loop(embeddings: torch.Tensor) -> torch.Tensor:
        per_set = embeddings.transpose(0, 1)
        return torch.stack([branch(x.reshape(-1, d_in)) for branch, x in zip(branches, per_set)], dim=1)

    return loop


def measure_interaction_vs_gemm(
    project: ProjectRunner,
    embeddings: torch.Tensor,
    loop: Optional[Callable[[torch.Tensor], torch.Tensor]],
    rounds: int,
) -> Dict[str, Any]:
    """Alternates the batched set arch (forward + backward), the per-set loop and the GEMM; medians and rates."""
    device = project.device
    set_arch, _ = project.detached_dense_arches()
    batch = embeddings.shape[0]
    width = set_arch.num_fields * set_arch.set_dim
    a = torch.randn(batch, width, device=device)
    b = torch.randn(width, width, device=device)
    gemm_reps = 4
    leaf = embeddings.detach().requires_grad_()
    loop_leaf = embeddings.detach().requires_grad_()

    precision = project.inner.precision

    def batched() -> None:
        with dense_autocast(precision, device.type):
            out = set_arch(leaf)
        out.backward(torch.ones_like(out))

    def per_set() -> None:
        assert loop is not None
        out = loop(loop_leaf)
        out.backward(torch.ones_like(out))

    def gemm() -> None:
        for _ in range(gemm_reps):
            torch.mm(a, b)

    a_bf16, b_bf16 = a.bfloat16(), b.bfloat16()

    def gemm_bf16() -> None:
        for _ in range(gemm_reps):
            torch.mm(a_bf16, b_bf16)

    batched(), gemm()
    if loop is not None:
        per_set()
    if precision == "bf16":
        gemm_bf16()
    times: Dict[str, List[float]] = {"batched": [], "gemm": [], "per_set_loop": [], "gemm_bf16": []}
    for _ in range(rounds):
        times["gemm"].append(timed(gemm, device) / gemm_reps)
        if precision == "bf16":
            times["gemm_bf16"].append(timed(gemm_bf16, device) / gemm_reps)
        times["batched"].append(timed(batched, device))
        if loop is not None:
            times["per_set_loop"].append(timed(per_set, device))
    set_arch.zero_grad(set_to_none=True)
    flops = set_arch_flops(set_arch, batch)
    if flops is None:
        flops = counted_flops(set_arch, tuple(embeddings.shape))
    gemm_flops = 2 * batch * width * width
    result: Dict[str, Any] = {
        "interaction_flops": int(flops),
        "interaction_ms": statistics.median(times["batched"]) * 1e3,
        "interaction_gflops": flops / statistics.median(times["batched"]) / 1e9,
        "gemm_shape": [batch, width, width],
        "gemm_gflops": gemm_flops / statistics.median(times["gemm"]) / 1e9,
        "interaction_vs_gemm": statistics.median(
            (flops / t_arch) / (gemm_flops / t_gemm) for t_arch, t_gemm in zip(times["batched"], times["gemm"])
        ),
        "rounds": rounds,
    }
    if precision == "bf16":
        result["gemm_gflops_bf16"] = gemm_flops / statistics.median(times["gemm_bf16"]) / 1e9
    if loop is not None:
        result["per_set_loop_ms"] = statistics.median(times["per_set_loop"]) * 1e3
        result["batched_vs_loop_speedup"] = paired_ratio(times["per_set_loop"], times["batched"])
    return result
