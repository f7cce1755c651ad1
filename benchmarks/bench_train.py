"""Training throughput of multiembed models against an honest plain-PyTorch baseline, measured in one run.

What is timed
    * **Project step**: the trainer's own build path (``multiembed.training.build.build_training``): the model on
      ``meta``, the fused in-backward sparse optimizer (device default: Adagrad on CPU, Adam on GPU), the plan and
      ``DistributedModelParallel`` on the job's process group (a one-rank gloo group when started alone), dense Adam,
      and TorchRec's ``TrainPipelineSparseDist``. One step is forward + backward + both optimizers.
    * **Baseline steps**: :mod:`paper_baseline` on the same batches: ``paper`` (the paper's public code: one
      ``nn.Embedding`` per set, a Python loop over sets, dense Adam over the whole tables); ``savvy`` (the same model
      as a savvy PyTorch user trains it, with **the package run's table optimizer, learning rates and threads**:
      sparse-gradient tables stepped by ``Adagrad`` where the package uses Adagrad, ``SparseAdam`` where it uses
      Adam, fused dense Adam); ``savvy_compiled`` (the savvy step with everything after the lookups under
      ``torch.compile``; ``--no-compiled-baseline`` skips it).
    * All run **interleaved** in blocks of steps (project, instrumented project, baselines, GEMM yardstick, project,
      ...) so that all see the same machine load; ratios are the median of the per-round ratios. The other table layout, the K sweep and the batch
      sweep are interleaved with the main model in phases of their own, afterwards.
    * The baseline trains in a **process of its own** (started by the harness, driven over a pipe, building the same
      batches from the same seed), as it would in practice: sharing one process let each contender's allocations
      reshape the other's malloc heap (measured: the project page-faulted 4 MB a step alone and 60-75 MB a step
      after the baseline had run in the same process), so the step times depended on the neighbour.
    * Under ``torchrun`` each rank trains its share of the global batch through DMP; ``samples_per_s`` is the global
      batch over the slowest rank's step. The baseline then runs beside every rank alone on the local batch (no
      gradient exchange, so an upper bound for it).
    * Memory: glibc returns large freed blocks to the kernel, so a step page-faults its big temporaries back in
      (``page_fault_mb_per_step``, each contender counted in its own process). Every contender's process gets the
      same allocator settings (``--malloc``): by default those ``multiembed train`` sets (blocks up to 32 MiB stay
      in the heap; the paper baseline's dense embedding gradients and Adam temporaries, over that limit, still fault
      every step); ``--malloc retain`` unmaps nothing (fewest faults, largest peak); report both settings.

Workload
    ``R`` rows per set are spread over the 39 fields of Criteo Kaggle in the proportions of the ``criteo-kaggle``
    preset (:func:`~multiembed.benchmarks.bench_train_workload.scaled_vocab_sizes`). One id per field per row, drawn
    as ``floor(D * u**a)`` with ``u`` uniform (``a = --id-exponent``, 3 by default: a heavy head, as click logs
    have; 1 is uniform). A pool of pre-built batches is cycled, so batch generation is never timed.

Step-time breakdown (measured inside real steps, :mod:`bench_train_phases`)
    The project's steps run once more per round with hooks that charge each moment of a step to one phase (loader,
    lookup fwd / bwd, set interaction fwd / bwd, over arch, optimizer, communication, other), so the phases of a
    step add up to it; ``breakdown.sum_vs_step`` compares their sum with the uninstrumented step. The eager
    baselines are timed the same way after the rounds. ``--profile`` also writes ``torch.profiler``'s operator
    table of a few full steps.

GEMM limit, efficiency and ceiling (:mod:`bench_train_yardstick`)
    The GEMMs of one real step are recorded (shapes, dtype, operand layouts); each, and a square 2048^3 GEMM, is
    timed on every GEMM kernel torch offers here (``addmm``; oneDNN's linear, the CPU fast path's kernel, where it
    works; ``bmm`` for batched calls; in bf16 and fp32 for a bf16 run) as one more contender of the throughput
    rounds, each at its fastest call. The limit (``gemm_limit_gflops``) is the highest of those rates, and the
    record is refused if any measured GEMM beat it. ``step_efficiency`` = the step's analytic GEMM FLOPs per
    second / the limit; ``ceiling`` = the GEMM FLOPs at the limit + the non-GEMM phases (loader, lookup,
    optimizer, communication) at their best instrumented step, and ``ceiling.step_share`` = ceiling / step.

FLOPs and the set arch against a GEMM
    ``interaction_gflops`` is the set interaction arch's analytic forward + backward GEMM FLOPs (from the layer
    shapes, :func:`~multiembed.benchmarks.bench_train_flops.set_arch_flops`) over its measured forward + backward
    time; ``gemm_gflops`` is an fp32 ``[B, F*d] x [F*d, F*d]`` GEMM, timed alternately with the arch in the same
    run, as is the baseline's per-set Python loop over branches of the same shapes (``set_arch.per_set_loop_ms``;
    :mod:`paper_baseline`'s branch modules, built in the harness's process; ``benchmarks/bench_set_arch.py`` sweeps
    that comparison over every backbone). Step FLOPs add the over arch (counted by ``torch.utils.flop_counter`` on a
    ``meta`` copy); element-wise work and lookups are not counted. ``executed_gemm_flops_per_step`` counts the
    recorded GEMMs instead (padded widths included).

Modules
    This driver runs the phases and the memory probes (:mod:`bench_memory`); one module per part:
    ``bench_train_workload`` (options, vocabulary, batches), ``bench_train_project`` and ``bench_train_baseline``
    (the contenders), ``bench_train_timing`` (timers, interleaving, paired ratios), ``bench_train_phases`` (the
    breakdown inside real steps), ``bench_train_yardstick`` (the GEMM limit and the ceiling), ``bench_train_flops``
    and ``bench_train_interaction`` (the FLOPs and the interaction-vs-GEMM measurement), ``bench_train_report`` (the
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
from multiembed.benchmarks.bench_train_flops import step_flops
from multiembed.benchmarks.bench_train_interaction import measure_interaction_vs_gemm, set_arch_per_set_loop
from multiembed.benchmarks.bench_train_phases import NON_GEMM_PHASES, summarize
from multiembed.benchmarks.bench_train_project import ProjectRunner, project_train_config
from multiembed.benchmarks.bench_train_timing import (
    all_ranks_max,
    interleave,
    page_faults,
    paired_ratio,
    peak_rss_bytes,
)
from multiembed.benchmarks.bench_train_workload import (
    BASELINE_KINDS,
    BenchBatch,
    BenchConfig,
    make_batches,
    scaled_vocab_sizes,
)
from multiembed.benchmarks.bench_train_yardstick import (
    GemmTimer,
    GemmYardstick,
    ceiling,
    check_gemm_limit,
    record_step_gemms,
    step_gemm_flops,
    step_gemm_rows,
    step_limits,
)
from multiembed.benchmarks.paper_baseline import SAVVY_TABLE_OPTIMIZERS
from multiembed.models import parse_model_name
from multiembed.models.precision import check_precision
from multiembed.runtime.malloc import apply_malloc_mode
from multiembed.runtime.stack import installed_versions
from multiembed.training.build import optimizer_config
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
    apply_malloc_mode(config.malloc)
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
    # The package's optimizers (the trainer's defaults for the device); the savvy baselines train with the same
    # table optimizer and learning rates.
    optim = optimizer_config(project_train_config(
        config.model, config.batch_size, device.type, config.layout, config.hidden, config.dropout, config.sharding,
        config.seed, config.precision, config.table_dtype,
    ), device.type)
    record["optimizers"] = dataclasses.asdict(optim)
    kinds = config.baseline_kinds
    if kinds and optim.sparse_optimizer not in SAVVY_TABLE_OPTIMIZERS:
        raise ValueError(f"the savvy baseline has no plain-PyTorch counterpart of the package's table optimizer "
                         f"{optim.sparse_optimizer!r}; pass --no-baseline")
    baselines: Dict[str, BaselineProcess] = {}
    try:
        for kind in kinds:
            baselines[kind] = BaselineProcess(BaselineSpec(
                model_name=config.model, vocab_sizes=dict(vocab), batch_size=local_batch,
                batch_pool=config.batch_pool, seed=config.seed + 1000 * ctx.rank, id_exponent=config.id_exponent,
                device=str(device), hidden=config.hidden, dropout=config.dropout, model_seed=config.seed,
                threads=torch.get_num_threads(), malloc=config.malloc, kind=kind,
                table_optimizer=optim.sparse_optimizer, table_lr=optim.sparse_lr, lr=optim.lr,
                weight_decay=optim.weight_decay,
            ))
        return _measure(config, ctx, record, vocab, baselines, rounds_small)
    finally:
        for baseline in baselines.values():
            baseline.close()


# The JSON prefix of each contender's figures: the paper-style baseline keeps the original ``baseline_*`` keys.
CONTENDER_PREFIX = {
    "project": "", "paper": "baseline_", "savvy": "savvy_baseline_", "savvy_compiled": "savvy_compiled_baseline_",
}
LIMITS_METHOD = (
    "the instrumented step split into: the analytic GEMM FLOPs at the GEMM limit (gemm_useful_at_limit); the padded "
    "widths' extra FLOPs at the limit (gemm_padding); each of the step's GEMMs at the best this run timed for its "
    "shape on any kernel, minus all at the limit (gemm_shapes); the step's GEMMs as they ran inside real steps "
    "(timed call by call by a TorchDispatchMode in separate instrumented steps: operand layouts, the kernels' copies "
    "of transposed operands, caches), minus each at its best (gemm_in_step); the dense arches' phases minus their "
    "GEMMs (dense_non_gemm: element-wise passes, layout copies, autograd); the other phases (non_gemm_phases). "
    "share_without_dense_non_gemm: the step's share of the GEMM limit with dense_non_gemm at zero"
)
PHASE_METHOD = (
    "measured inside real training steps (bench_train_phases: hooks switch the phase a step's wall time is charged "
    "to, so the phases of a step add up to it); ms = mean over the instrumented steps, which ran as one more "
    "contender of the throughput rounds; sum_vs_step = their sum over the uninstrumented median step"
)


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
    if dataclasses.asdict(project.optim_config) != record["optimizers"]:
        raise RuntimeError(f"the project trains with {project.optim_config}, the baselines were given "
                           f"{record['optimizers']}")
    embeddings = project.embeddings(batches[0])
    project.run(batches, max(config.warmup_steps, 1))
    step_gemms = record_step_gemms(lambda: project.run(batches, 1))
    record["step_gemms"] = step_gemm_rows(step_gemms)
    record["memory"] = {"peak_rss_after_project_bytes": peak_rss_bytes()}
    record["bytes"] = project.byte_counts()
    flops = step_flops(project.inner, local_batch)
    record["flops_per_step"] = flops * ctx.world_size
    record["executed_gemm_flops_per_step"] = step_gemm_flops(step_gemms) * ctx.world_size

    phase_steps: List[Dict[str, float]] = []
    contenders: Dict[str, Callable[[int, int], float]] = {
        "project": lambda n, o: project.run(batches, n, o),
        "phases": lambda n, o: project.run_phases(batches, n, o, phase_steps),
    }
    for kind, process in baselines.items():
        log(f"bench: warming up the {kind} baseline")
        process.run(max(config.warmup_steps, 1))
        record[CONTENDER_PREFIX[kind] + "bytes"] = process.byte_counts()
        process.page_faults = 0
        contenders[kind] = functools.partial(lambda n, o, p: p.run(n, o), p=process)
    # The GEMM yardstick as one more contender of the same rounds (each of its GEMMs is taken at its best call).
    yardstick = GemmYardstick(step_gemms, config.precision, device)
    contenders["gemm"] = lambda n, o: yardstick.run_round()
    faults = {"project": 0}

    def counting_faults(name: str, run: Callable[[int, int], float]) -> Callable[[int, int], float]:
        if name != "project":
            return run  # counted in its own process, or not the plain training step
        def counted(steps: int, offset: int) -> float:
            before = page_faults()
            seconds = run(steps, offset)
            faults[name] += page_faults() - before
            return seconds

        return counted

    log("bench: throughput, interleaved: " + ", ".join(contenders))
    per_step = interleave({name: counting_faults(name, run) for name, run in contenders.items()}, config.steps,
                          config.block_steps, progress, "throughput")
    per_step.pop("gemm")
    phase_times = per_step.pop("phases")
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
    for kind in BASELINE_KINDS:
        record[CONTENDER_PREFIX[kind] + "samples_per_s"] = None
    # The baselines compute the same model (paper_baseline.copy_weights_from), so the same GEMM FLOPs per step.
    for kind in baselines:
        prefix = CONTENDER_PREFIX[kind]
        seconds = all_ranks_max(statistics.median(per_step[kind]), device)
        record[prefix + "step_ms"] = seconds * 1e3
        record[prefix + "samples_per_s"] = config.batch_size / seconds
        record[prefix + "achieved_step_gflops"] = flops / seconds / 1e9
        record["speedup_vs_" + prefix.rstrip("_")] = paired_ratio(per_step[kind], per_step["project"])
    record["blocks_ms_per_step"] = {
        ("baseline" if name == "paper" else name): [t * 1e3 for t in times] for name, times in per_step.items()
    }

    # Step efficiency and ceiling, per rank (each rank has its own cores): the yardstick may not be slower than any
    # GEMM the step runs (check_gemm_limit refuses the record otherwise).
    limit = yardstick.result()
    check_gemm_limit(limit, record["step_gemms"])
    record["gemm_limit"] = limit
    record["gemm_limit_gflops"] = limit["gflops"]
    for kind in ("project", *baselines):
        record[CONTENDER_PREFIX[kind] + "step_efficiency"] = (
            flops / statistics.median(per_step[kind]) / (limit["gflops"] * 1e9)
        )
    record["step_efficiency_method"] = (
        "(analytic forward + backward GEMM FLOPs of one step per rank / the median step time) / the GEMM limit "
        "(gemm_limit: " + limit["method"] + "); element-wise work and lookups are not counted as FLOPs"
    )
    local_step_ms = statistics.median(per_step["project"]) * 1e3
    breakdown = summarize(phase_steps, local_step_ms)
    breakdown["time_ratio_vs_uninstrumented"] = paired_ratio(phase_times, per_step["project"])
    breakdown["method"] = PHASE_METHOD
    record["breakdown_ms"] = breakdown.pop("ms")
    record["breakdown"] = breakdown
    record["ceiling"] = {
        **ceiling(flops, limit["gflops"], breakdown["non_gemm_best_ms"], local_step_ms),
        "method": ("the step's analytic GEMM FLOPs per rank at the GEMM limit, plus the smallest per-step sum of "
                   f"its non-GEMM phases ({', '.join(NON_GEMM_PHASES)}) over the instrumented steps; step_share = "
                   "ceiling ms / median step ms"),
    }
    # What keeps the step from the limit: its GEMMs timed call by call inside real steps (separate steps: the timer
    # slows every other op), charged to the breakdown's phases.
    timer = GemmTimer(device)
    timer_steps = max(config.block_steps, 2 if config.quick else 4)
    project.run_phases(batches, timer_steps, 0, [], gemm_timer=timer)
    record["limits"] = {
        **step_limits(
            record["breakdown_ms"], {phase: 1e3 * s / timer_steps for phase, s in timer.seconds.items()},
            {phase: f / timer_steps for phase, f in timer.flops.items()}, flops, step_gemm_flops(step_gemms),
            yardstick.step_best_ms(), limit["gflops"], local_step_ms,
        ),
        "timed_steps": timer_steps,
        "method": LIMITS_METHOD,
    }
    for kind, process in baselines.items():
        if kind == "savvy_compiled":
            continue  # hooks inside its compiled region would recompile it
        prefix = CONTENDER_PREFIX[kind]
        steps = process.phases(max(config.block_steps, 3 if config.quick else 5))
        summary = summarize(steps, record[prefix + "step_ms"])
        record[prefix + "breakdown_ms"] = summary.pop("ms")
        record[prefix + "breakdown"] = summary

    log("bench: interaction arch vs GEMM")
    loop = set_arch_per_set_loop(config, project)
    record["set_arch"] = measure_interaction_vs_gemm(project, embeddings, loop, rounds_small)
    record["interaction_gflops"] = record["set_arch"]["interaction_gflops"]
    record["gemm_gflops"] = record["set_arch"]["gemm_gflops"]
    record["interaction_vs_gemm"] = record["set_arch"]["interaction_vs_gemm"]
    if config.compare_layouts:
        record["layouts"] = compare_layouts(config, ctx, vocab, batches, project, progress)
    if config.precision == "bf16" and config.compare_precision:
        log("bench: bf16 against fp32, interleaved")
        record["precisions"] = compare_precisions(config, ctx, vocab, batches, project, progress)

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
    with profile(activities=activities, record_shapes=True) as prof:
        project.run(batches, steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=60)
    Path(path).write_text(f"{table}\n\nBy input shape:\n{by_shape}\n", encoding="utf-8")
    return path
