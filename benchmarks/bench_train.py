"""Training throughput of multiembed models against an honest plain-PyTorch baseline, measured in one run.

What is timed
    * **Project step**: the trainer's own build path (``multiembed.training.build.build_training``): the model on
      ``meta``, the fused in-backward sparse optimizer (device default: Adagrad on CPU, Adam on GPU), the plan and
      ``DistributedModelParallel`` on the job's process group (a one-rank gloo group when started alone), dense Adam,
      and TorchRec's ``TrainPipelineSparseDist``. One step is forward + backward + both optimizers.
    * **Baseline step**: :mod:`paper_baseline` (the paper's public code: one ``nn.Embedding`` per set, a Python loop
      over sets, dense Adam over the whole tables), on the same batches.
    * The two run **interleaved** in blocks of steps (project, baseline, project, ...) so that both see the same
      machine load; ratios are the median of the per-round ratios. The other table layout, the K sweep and the batch
      sweep are interleaved with the main model in phases of their own, afterwards.
    * The baseline trains in a **process of its own** (started by the harness, driven over a pipe, building the same
      batches from the same seed), as it would in practice: sharing one process let each contender's allocations
      reshape the other's malloc heap (measured: the project page-faulted 4 MB a step alone and 60-75 MB a step
      after the baseline had run in the same process), so the step times depended on the neighbour.
    * Under ``torchrun`` each rank trains its share of the global batch through DMP; ``samples_per_s`` is the global
      batch over the slowest rank's step. The baseline then runs beside every rank alone on the local batch (no
      gradient exchange, so an upper bound for it).
    * Memory: glibc returns large freed blocks to the kernel, so a step page-faults its big temporaries back in
      (``page_fault_mb_per_step``, each contender counted in its own process; the baseline's dense embedding
      gradients and Adam temporaries, over glibc's 32 MB mmap limit, fault every step). ``--malloc retain`` keeps
      freed memory in the process for both contenders (both processes); report both settings.

Workload
    ``R`` rows per set are spread over the 39 fields of Criteo Kaggle in the proportions of the ``criteo-kaggle``
    preset (:func:`~multiembed.benchmarks.bench_train_workload.scaled_vocab_sizes`). One id per field per row, drawn
    as ``floor(D * u**a)`` with ``u`` uniform (``a = --id-exponent``, 3 by default: a heavy head, as click logs
    have; 1 is uniform). A pool of pre-built batches is cycled, so batch generation is never timed.

Step-time breakdown (method: separately timed sub-steps on the same model and batch, median of repetitions)
    ``input_dist``: the sharded collection's input distribution; ``embedding_fwd``: the sparse arch's forward less
    ``input_dist`` (lookup, output distribution, set slicing); ``embedding_bwd``: backward through the lookup,
    which runs the fused optimizer's row updates; ``interaction_fwd`` / ``interaction_bwd``: the set interaction
    arch; ``over_arch``: mean over sets, over arch and loss, forward + backward; ``optimizer``: ``zero_grad`` +
    ``step`` of the combined optimizer (dense Adam; the fused part already ran in backward); ``other``: the full step
    less the parts (pipeline bookkeeping, DDP gradient hooks, autograd overhead). ``--profile`` also writes
    ``torch.profiler``'s operator table of a few full steps.

FLOPs and GEMM rate
    ``interaction_gflops`` is the set interaction arch's analytic forward + backward GEMM FLOPs (from the layer
    shapes, :func:`~multiembed.benchmarks.bench_train_flops.set_arch_flops`) over its measured forward + backward
    time; ``gemm_gflops`` is an fp32 ``[B, F*d] x [F*d, F*d]`` GEMM, timed alternately with the arch in the same
    run, as is the baseline's per-set Python loop over branches of the same shapes (``set_arch.per_set_loop_ms``;
    :mod:`paper_baseline`'s branch modules, built in the harness's process; ``benchmarks/bench_set_arch.py`` sweeps
    that comparison over every backbone). Step FLOPs add the over arch (counted by ``torch.utils.flop_counter`` on a
    ``meta`` copy); element-wise work and lookups are not counted.

Modules
    This driver runs the phases and the memory probes (:mod:`bench_memory`); one module per part:
    ``bench_train_workload`` (options, vocabulary, batches), ``bench_train_project`` and ``bench_train_baseline``
    (the contenders), ``bench_train_timing`` (timers, interleaving, paired ratios), ``bench_train_flops`` and
    ``bench_train_interaction`` (the FLOPs and the interaction-vs-GEMM measurement), ``bench_train_report`` (the
    table and the JSON record).

Run (the target configuration; ``--malloc retain`` for the second memory setting)::

    .venv/bin/python -m multiembed.cli bench --model dcnv2-me-4x --batch-size 2048 --rows-per-set 1100000 \\
        --steps 20 --json runs/bench.json
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from multiembed.benchmarks import bench_memory, machine
from multiembed.benchmarks.bench_train_baseline import BaselineProcess, BaselineSpec
from multiembed.benchmarks.bench_train_flops import fp32_gemm_unit, step_flops
from multiembed.benchmarks.bench_train_interaction import measure_interaction_vs_gemm, set_arch_per_set_loop
from multiembed.benchmarks.bench_train_project import ProjectRunner
from multiembed.benchmarks.bench_train_timing import (
    all_ranks_max,
    interleave,
    page_faults,
    paired_ratio,
    peak_rss_bytes,
    timed,
)
from multiembed.benchmarks.bench_train_workload import (
    BASELINE_KINDS,
    BenchBatch,
    BenchConfig,
    make_batches,
    scaled_vocab_sizes,
)
from multiembed.models import parse_model_name
from multiembed.models.precision import check_precision
from multiembed.runtime.malloc import retain_freed_memory
from multiembed.runtime.stack import installed_versions
from multiembed.training.distributed import DistContext, init_distributed


def conditions(config: BenchConfig, ctx: DistContext, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The machine and software the numbers were measured on (CPU facts: :func:`machine.cpu_facts`)."""
    info: Dict[str, Any] = {
        "command": " ".join(["multiembed", "bench", *argv]) if argv is not None else None,
        **machine.cpu_facts(),
        "torch_threads": torch.get_num_threads(),
        "malloc": config.malloc,
        "load_average_start": list(os.getloadavg()),
        "device": str(ctx.device),
        "backend": ctx.backend,
        "world_size": ctx.world_size,
        "versions": installed_versions(),
        "python": platform.python_version(),
    }
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    return info


def run_benchmark(config: BenchConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs every measurement of ``config`` and returns the result record (see :func:`format_table`)."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.malloc == "retain":
        retain_freed_memory()
    ctx = init_distributed(config.device)
    check_precision(config.precision, ctx.device.type)
    if config.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must divide evenly over {ctx.world_size} ranks")
    local_batch = config.batch_size // ctx.world_size
    vocab = scaled_vocab_sizes(config.rows_per_set)
    device = ctx.device
    rounds_small = 3 if config.quick else 7
    record: Dict[str, Any] = {"config": dataclasses.asdict(config), "conditions": conditions(config, ctx, argv)}
    record["config"]["fields"] = len(vocab)
    record["config"]["rows_per_set_actual"] = sum(vocab.values())
    record["config"]["local_batch"] = local_batch
    if config.memory_only:
        if ctx.is_main:
            record["memory_per_row"] = bench_memory.measure_memory(
                memory_specs(config), config.memory_rows, config.memory_budget_gib,
                log=(lambda message: print(message, file=sys.stderr, flush=True)) if config.progress else None,
            )
        record["conditions"]["load_average_end"] = list(os.getloadavg())
        return record
    baselines: Dict[str, BaselineProcess] = {}
    try:
        if config.with_baseline:
            for kind in BASELINE_KINDS:
                baselines[kind] = BaselineProcess(BaselineSpec(
                    model_name=config.model, vocab_sizes=dict(vocab), batch_size=local_batch,
                    batch_pool=config.batch_pool, seed=config.seed + 1000 * ctx.rank, id_exponent=config.id_exponent,
                    device=str(device), hidden=config.hidden, dropout=config.dropout, model_seed=config.seed,
                    threads=torch.get_num_threads(), malloc=config.malloc, kind=kind,
                ))
        return _measure(config, ctx, record, vocab, baselines, rounds_small)
    finally:
        for baseline in baselines.values():
            baseline.close()


# The JSON prefix of each contender's figures: the paper-style baseline keeps the original ``baseline_*`` keys.
CONTENDER_PREFIX = {"project": "", "paper": "baseline_", "savvy": "savvy_baseline_"}


def _measure(
    config: BenchConfig, ctx: DistContext, record: Dict[str, Any], vocab: Mapping[str, int],
    baselines: Mapping[str, "BaselineProcess"], rounds_small: int,
) -> Dict[str, Any]:
    """The measurements of :func:`run_benchmark`, filling ``record``."""
    device, local_batch = ctx.device, config.batch_size // ctx.world_size
    progress = config.progress and ctx.is_main

    def log(message: str) -> None:
        if ctx.is_main and config.progress:
            print(message, file=sys.stderr, flush=True)

    batches = make_batches(vocab, local_batch, config.batch_pool, config.seed + 1000 * ctx.rank, config.id_exponent,
                           device)
    log(f"bench: {config.model}, {len(vocab)} fields, {sum(vocab.values()):,} rows per set, batch {config.batch_size}")
    project = ProjectRunner(config.model, vocab, ctx, local_batch, config.layout, config.hidden, config.dropout,
                            config.sharding, config.seed, config.precision, config.table_dtype)
    log("bench: step-time breakdown")
    reps = 3 if config.quick else 5
    parts, embeddings = project.breakdown(batches[0], reps)
    project.run(batches, max(config.warmup_steps, 1))
    record["memory"] = {"peak_rss_after_project_bytes": peak_rss_bytes()}
    record["bytes"] = project.byte_counts()
    flops = step_flops(project.inner, local_batch)
    record["flops_per_step"] = flops * ctx.world_size

    contenders: Dict[str, Callable[[int, int], float]] = {"project": lambda n, o: project.run(batches, n, o)}
    for kind, process in baselines.items():
        process.run(max(config.warmup_steps, 1))
        record[CONTENDER_PREFIX[kind] + "bytes"] = process.byte_counts()
        process.page_faults = 0
        contenders[kind] = functools.partial(lambda n, o, p: p.run(n, o), p=process)
    # The fp32 GEMM as one more contender of the same rounds: step efficiency compares each round's step with that
    # round's GEMM rate, so a shared machine's load changes both alike.
    gemm_unit, gemm_unit_flops = fp32_gemm_unit(project.inner, local_batch, device)
    gemm_unit()
    contenders["gemm"] = lambda n, o: timed(lambda: [gemm_unit() for _ in range(n)], device)
    faults = {name: 0 for name in contenders}

    def counting_faults(name: str, run: Callable[[int, int], float]) -> Callable[[int, int], float]:
        if name in baselines or name == "gemm":
            return run  # counted in its own process, or not a training step
        def counted(steps: int, offset: int) -> float:
            before = page_faults()
            seconds = run(steps, offset)
            faults[name] += page_faults() - before
            return seconds

        return counted

    log("bench: throughput, interleaved: " + ", ".join(contenders))
    per_step = interleave({name: counting_faults(name, run) for name, run in contenders.items()}, config.steps,
                          config.block_steps, progress, "throughput")
    gemm_times = per_step.pop("gemm")
    faults.pop("gemm")
    for kind, process in baselines.items():
        faults[kind] = process.page_faults
    page = resource.getpagesize()
    record["page_fault_mb_per_step"] = {
        ("baseline" if name == "paper" else name): count * page / config.steps / 2**20 for name, count in faults.items()
    }
    step_s = all_ranks_max(statistics.median(per_step["project"]), device)
    record["step_ms"] = step_s * 1e3
    record["samples_per_s"] = config.batch_size / step_s
    record["achieved_step_gflops"] = record["flops_per_step"] / step_s / 1e9
    record["baseline_samples_per_s"] = None
    record["savvy_baseline_samples_per_s"] = None
    # The baselines compute the same model (paper_baseline.copy_weights_from), so the same GEMM FLOPs per step.
    baseline_flops = flops if baselines else 0
    for kind in baselines:
        prefix = CONTENDER_PREFIX[kind]
        seconds = all_ranks_max(statistics.median(per_step[kind]), device)
        record[prefix + "step_ms"] = seconds * 1e3
        record[prefix + "samples_per_s"] = config.batch_size / seconds
        record[prefix + "achieved_step_gflops"] = baseline_flops / seconds / 1e9
        record["speedup_vs_" + prefix.rstrip("_")] = paired_ratio(per_step[kind], per_step["project"])
    record["blocks_ms_per_step"] = {
        ("baseline" if name == "paper" else name): [t * 1e3 for t in times] for name, times in per_step.items()
    }
    if config.compare_layouts:
        record["layouts"] = compare_layouts(config, ctx, vocab, batches, project, progress)
    if config.precision == "bf16" and config.compare_precision:
        log("bench: bf16 against fp32, interleaved")
        record["precisions"] = compare_precisions(config, ctx, vocab, batches, project, progress)

    parts["other"] = record["step_ms"] - sum(parts.values())
    record["breakdown_ms"] = parts
    record["breakdown_method"] = (
        f"separately timed sub-steps, median of {reps} repetitions; other = step - sum of parts (negative when the "
        "parts, each paying its own allocations and page faults alone, add up to more than the step)"
    )
    for kind, process in baselines.items():
        prefix = CONTENDER_PREFIX[kind]
        baseline_parts = process.breakdown(reps)
        baseline_parts["other"] = record[prefix + "step_ms"] - sum(baseline_parts.values())
        record[prefix + "breakdown_ms"] = baseline_parts

    log("bench: interaction arch vs GEMM")
    loop = set_arch_per_set_loop(config, project)
    record["set_arch"] = measure_interaction_vs_gemm(project, embeddings, loop, rounds_small)
    record["interaction_gflops"] = record["set_arch"]["interaction_gflops"]
    record["gemm_gflops"] = record["set_arch"]["gemm_gflops"]
    record["interaction_vs_gemm"] = record["set_arch"]["interaction_vs_gemm"]
    # Step efficiency: the step's GEMM FLOPs per second over the fp32 GEMM rate of the same round (median over the
    # throughput rounds, where the GEMM ran as one more contender); per rank (each rank has its own cores).
    record["gemm_gflops_in_rounds"] = gemm_unit_flops / statistics.median(gemm_times) / 1e9
    record["gemm_unit"] = {"flops": gemm_unit_flops, "blocks_ms": [t * 1e3 for t in gemm_times]}
    for kind in ("project", *baselines):
        prefix = CONTENDER_PREFIX[kind]
        record[prefix + "step_efficiency"] = statistics.median(
            (flops / t_step) / (gemm_unit_flops / t_gemm) for t_step, t_gemm in zip(per_step[kind], gemm_times)
        )
    record["step_efficiency_method"] = (
        "median over the throughput rounds of (analytic forward + backward GEMM FLOPs of one step per rank / that "
        f"round's step time) / (that round's fp32 GEMM rate, {'x'.join(map(str, record['set_arch']['gemm_shape']))}, "
        "timed as one more contender of the rounds); element-wise work and lookups are not counted as FLOPs"
    )

    if config.profile:
        record["profile"] = write_profile(project, batches, config.profile, steps=3 if config.quick else 5)

    for kind, process in baselines.items():
        record["memory"][("baseline" if kind == "paper" else CONTENDER_PREFIX[kind].rstrip("_"))
                         + "_process_peak_rss_bytes"] = process.peak_rss_bytes()
        process.close()
    if config.scaling:
        record["scaling_k"] = scale_over_k(config, ctx, vocab, batches, project, progress)
        record["scaling_batch"] = scale_over_batch(config, ctx, vocab, project, progress)
    record["memory"]["peak_rss_bytes"] = peak_rss_bytes()
    if device.type == "cuda":
        record["memory"]["gpu_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    if config.memory and ctx.is_main and device.type == "cpu":
        record["memory_per_row"] = bench_memory.measure_memory(
            memory_specs(config), config.memory_rows, config.memory_budget_gib, log=log
        )
    record["conditions"]["load_average_end"] = list(os.getloadavg())
    return record


def memory_specs(config: BenchConfig) -> List[bench_memory.MemoryProbeSpec]:
    """The ``--memory`` phase's contenders: the savvy baseline, then the package at each of ``memory_variants``."""
    common = dict(model=config.model, rows_per_set=config.rows_per_set, batch_size=config.batch_size,
                  steps=config.memory_steps, hidden=config.hidden, dropout=config.dropout, seed=config.seed,
                  id_exponent=config.id_exponent, threads=config.threads)
    specs = [bench_memory.MemoryProbeSpec(kind="savvy", **common)] if config.with_baseline else []
    for variant in config.memory_variants:
        optimizer, _, dtype = variant.partition(":")
        specs.append(bench_memory.MemoryProbeSpec(kind="project", sparse_optimizer=optimizer, table_dtype=dtype,
                                                  **common))
    return specs


def compare_precisions(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], batches: Sequence[BenchBatch],
    project: ProjectRunner, progress: bool,
) -> Dict[str, Any]:
    """Step time of the main (bf16) model against the same model in fp32, interleaved in a phase of their own
    (same initial weights, same batches). Keyed by precision, plus ``bf16_speedup`` (median paired fp32 / bf16)."""
    other = ProjectRunner(config.model, vocab, ctx, batches[0].size, config.layout, config.hidden, config.dropout,
                          config.sharding, config.seed, "fp32", config.table_dtype)
    other.run(batches, max(config.warmup_steps, 1))
    runners = {config.precision: project, "fp32": other}
    per_step = interleave({name: (lambda n, o, r=runner: r.run(batches, n, o)) for name, runner in runners.items()},
                          config.steps, config.block_steps, progress, "precisions")
    rows: Dict[str, Any] = {}
    for name in runners:
        seconds = all_ranks_max(statistics.median(per_step[name]), ctx.device)
        rows[name] = {"step_ms": seconds * 1e3, "samples_per_s": config.batch_size / seconds}
    rows["bf16_speedup"] = paired_ratio(per_step["fp32"], per_step[config.precision])
    return rows


def compare_layouts(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], batches: Sequence[BenchBatch],
    project: ProjectRunner, progress: bool,
) -> Dict[str, Dict[str, float]]:
    """Step time of the main model against the same model with the other table layout, interleaved in a phase of
    their own (after the baseline comparison: a second model in the process reshapes its malloc heap, see the module
    docstring, so it must not share the main measurement). Keyed by layout name."""
    layout = "per_set" if config.layout == "fused" else "fused"
    other = ProjectRunner(config.model, vocab, ctx, batches[0].size, layout, config.hidden, config.dropout,
                          config.sharding, config.seed, config.precision, config.table_dtype)
    other.run(batches, max(config.warmup_steps, 1))
    runners = {config.layout: project, layout: other}
    faults = {name: 0 for name in runners}

    def timed(name: str, runner: ProjectRunner) -> Callable[[int, int], float]:
        def run(steps: int, offset: int) -> float:
            before = page_faults()
            seconds = runner.run(batches, steps, offset)
            faults[name] += page_faults() - before
            return seconds

        return run

    per_step = interleave({name: timed(name, runner) for name, runner in runners.items()}, config.steps,
                          config.block_steps, progress, "layouts")
    rows = {}
    for name in runners:
        seconds = all_ranks_max(statistics.median(per_step[name]), ctx.device)
        rows[name] = {
            "step_ms": seconds * 1e3,
            "samples_per_s": config.batch_size / seconds,
            "page_fault_mb_per_step": faults[name] * resource.getpagesize() / config.steps / 2**20,
        }
    rows[layout]["time_ratio_vs_" + config.layout] = paired_ratio(per_step[layout], per_step[config.layout])
    return rows


def scale_over_k(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], batches: Sequence[BenchBatch],
    project: ProjectRunner, progress: bool,
) -> List[Dict[str, Any]]:
    """Step time vs the number of sets K at fixed d (the same backbone), interleaved; FLOPs from the layer shapes."""
    spec = parse_model_name(config.model)
    k_values = tuple(sorted(set((1, 2) if config.quick else config.k_values)))
    runners: Dict[int, ProjectRunner] = {}
    for k in k_values:
        if k == spec.num_sets:
            runners[k] = project
            continue
        # K sets of the model's own set width d (SE models sweep the ME family of the same d).
        k_spec = dataclasses.replace(spec, mode="me" if spec.mode == "se" else spec.mode, scale=k, num_sets=k)
        runners[k] = ProjectRunner(k_spec, vocab, ctx, batches[0].size, config.layout, config.hidden, config.dropout,
                                   config.sharding, config.seed, config.precision, config.table_dtype)
        runners[k].run(batches, max(config.warmup_steps, 1))
    per_step = interleave(
        {str(k): (lambda n, o, r=runner: r.run(batches, n, o)) for k, runner in runners.items()},
        config.steps, config.block_steps, progress, "scaling K",
    )
    rows = []
    base_k = k_values[0]
    base_flops = step_flops(runners[base_k].inner, batches[0].size)
    for k, runner in runners.items():
        seconds = all_ranks_max(statistics.median(per_step[str(k)]), ctx.device)
        flops = step_flops(runner.inner, batches[0].size) * ctx.world_size
        rows.append({
            "num_sets": k,
            "step_ms": seconds * 1e3,
            "samples_per_s": config.batch_size / seconds,
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9,
            "time_ratio": paired_ratio(per_step[str(k)], per_step[str(base_k)]),
            "flops_ratio": flops / (base_flops * ctx.world_size),
        })
    return rows


def scale_over_batch(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], project: ProjectRunner, progress: bool
) -> List[Dict[str, Any]]:
    """Step time and samples/s vs the global batch size, on the main model, interleaved."""
    sizes = tuple(sorted(set(config.batch_sizes)))
    if config.quick:
        sizes = (max(ctx.world_size, config.batch_size // 2), config.batch_size)
    pools: Dict[int, List[BenchBatch]] = {}
    for size in sizes:
        if size % ctx.world_size:
            raise ValueError(f"--batch-sizes: {size} does not divide evenly over {ctx.world_size} ranks")
        pools[size] = make_batches(vocab, size // ctx.world_size, config.batch_pool, config.seed + 7 + 1000 * ctx.rank,
                                   config.id_exponent, ctx.device)
        project.run(pools[size], 1)
    per_step = interleave(
        {str(size): (lambda n, o, p=pool: project.run(p, n, o)) for size, pool in pools.items()},
        config.steps, config.block_steps, progress, "scaling batch",
    )
    rows = []
    for size in sizes:
        seconds = all_ranks_max(statistics.median(per_step[str(size)]), ctx.device)
        flops = step_flops(project.inner, size // ctx.world_size) * ctx.world_size
        rows.append({
            "batch_size": size,
            "step_ms": seconds * 1e3,
            "samples_per_s": size / seconds,
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9,
        })
    return rows


def write_profile(project: ProjectRunner, batches: Sequence[BenchBatch], path: str, steps: int) -> str:
    """``torch.profiler`` operator table (self time) of ``steps`` full training steps, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if project.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        project.run(batches, steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    Path(path).write_text(table + "\n", encoding="utf-8")
    return path
