"""The benchmark's record as a table and as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Mapping, Optional

from multiembed.benchmarks.bench_train_phases import PHASES

# Each contender's JSON prefix, in the table's column order.
PREFIXES = ("", "baseline_", "savvy_baseline_", "savvy_compiled_baseline_")


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def memory_lines(record: Mapping[str, Any]) -> List[str]:
    """The ``--memory`` table (no lines without it)."""
    memory = record.get("memory_per_row")
    if not memory:
        return []
    lines = [
        "",
        f"Memory per table row ({memory['method']}; sizes {', '.join(f'{r:,}' for r in memory['rows_per_set'])} "
        f"rows per set; largest rows per set within {memory['budget_gib']:g} GiB):",
        "",
        "| contender | bytes per row (K sets) | per set-row | fixed MB | vs savvy | max rows per set | assumes |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = memory.get("ratio_vs_savvy", {})
    for label, row in memory["contenders"].items():
        lines.append(
            f"| {label} | {_fmt(row['bytes_per_row'])} | {_fmt(row['bytes_per_set_row'])} | "
            f"{row['fixed_bytes'] / 2**20:,.0f} | {_fmt(ratios.get(label), 2)} | "
            f"{row['max_rows_per_set'] or 0:,} | {row['assumes']} |"
        )
    return lines


def limit_lines(record: Mapping[str, Any]) -> List[str]:
    """The GEMM limit (its fastest GEMM) and the step's ceiling."""
    limit, ceiling = record["gemm_limit"], record["ceiling"]
    best = limit["best"]
    return [
        f"GEMM limit: {_fmt(limit['gflops'])} GFLOP/s ({best['backend']} {best['dtype']} [{best['m']}, {best['k']}] "
        f"x [{best['k']}, {best['n']}], the fastest of {len(limit['rows'])} GEMMs: the square and the step's "
        f"{len(record['step_gemms'])} signatures on every backend). Ceiling: {_fmt(ceiling['gemm_ms'])} ms of GEMMs "
        f"at the limit + {_fmt(ceiling['non_gemm_ms'])} ms of non-GEMM work at its best = {_fmt(ceiling['ms'])} ms; "
        f"the step reaches {_fmt(ceiling['step_share'], 2)} of it.",
        *limits_lines(record),
    ]


LIMIT_TERMS = {
    "gemm_useful_at_limit": "useful GEMM FLOPs at the limit",
    "gemm_padding": "padded widths' extra FLOPs",
    "gemm_shapes": "the step's GEMM shapes (each at its best)",
    "gemm_in_step": "GEMMs as run inside the step (layouts, operand copies)",
    "dense_non_gemm": "dense arches' non-GEMM work",
    "non_gemm_phases": "lookups, table update, optimizer, communication, loader, other",
}


def limits_lines(record: Mapping[str, Any]) -> List[str]:
    """Where the step's time goes between the GEMM limit and the step (``limits``), or nothing without it."""
    limits = record.get("limits")
    if not limits:
        return []
    terms = "; ".join(f"{LIMIT_TERMS.get(name, name)} {_fmt(ms)}" for name, ms in limits["terms_ms"].items())
    return [
        f"Step split (ms): {terms}; sum {_fmt(limits['sum_ms'])} ({_fmt(limits['sum_vs_step'], 2)} of the step). "
        f"The step's GEMMs ran at {_fmt(limits['gemm_in_step_gflops'])} GFLOP/s; with no dense non-GEMM work the "
        f"step would reach {_fmt(limits['share_without_dense_non_gemm'], 2)} of the GEMM limit.",
    ]


def format_table(record: Mapping[str, Any]) -> str:
    """The result as markdown tables (throughput against both baselines, breakdown, memory per row, scaling)."""
    cfg, cond = record["config"], record["conditions"]
    if "samples_per_s" not in record:  # --memory-only
        return "\n".join([
            f"### {cfg['model']}: memory per table row (CPU: {cond['cpu']}, {cond['cpu_count']} CPUs, capability "
            f"{cond.get('cpu_capability')}, native bf16 {cond.get('mkldnn_bf16_supported')})",
            *memory_lines(record),
        ])
    sizes = record["bytes"]
    baseline_bytes = [record.get(prefix + "bytes", {}) for prefix in PREFIXES[1:]]

    def per_contender(key: str, digits: int = 1) -> str:
        return " | ".join(_fmt(record.get(prefix + key), digits) for prefix in PREFIXES)

    def megabytes(value: Optional[int]) -> str:
        return "-" if value is None else f"{value / 2**20:,.1f}"

    lines = [
        f"### {cfg['model']}, batch {cfg['batch_size']}, {cfg['rows_per_set_actual']:,} rows per set over "
        f"{cfg['fields']} fields, precision {cfg.get('precision', 'fp32')}, tables {cfg.get('table_dtype', 'fp32')} "
        f"({cond['device']}, {cond['torch_threads']} threads, malloc {cond['malloc']})",
        "",
        f"CPU: {cond['cpu']}, {cond['cpu_count']} CPUs, capability {cond.get('cpu_capability')}, native bf16 "
        f"{cond.get('mkldnn_bf16_supported')}, fp32 GEMM backend {cond.get('gemm_backend', {}).get('float32')}.",
        "",
        "| metric | project | paper baseline | savvy baseline | savvy compiled | project / paper | project / savvy "
        "| project / savvy compiled |",
        "|---|---|---|---|---|---|---|---|",
        f"| samples/s | {per_contender('samples_per_s', 0)} | "
        + " | ".join(_fmt(record.get("speedup_vs_" + prefix.rstrip("_")), 2) for prefix in PREFIXES[1:]) + " |",
        f"| step ms | {per_contender('step_ms')} | | | |",
        f"| step GFLOP/s (fwd+bwd GEMMs, {_fmt(record['flops_per_step'] / 1e9)} GFLOP a step) | "
        f"{per_contender('achieved_step_gflops')} | | | |",
        f"| step efficiency (step GFLOP/s / GEMM limit {_fmt(record['gemm_limit_gflops'])} GFLOP/s) | "
        f"{per_contender('step_efficiency', 2)} | | | |",
        f"| embedding / dense parameter MB | {megabytes(sizes['embedding_param_bytes'])} / "
        f"{megabytes(sizes['dense_param_bytes'])} | "
        + " | ".join(
            f"{megabytes(b['embedding_param_bytes'])} / {megabytes(b['dense_param_bytes'])}" if b else "-"
            for b in baseline_bytes
        ) + " | | | |",
        f"| optimizer state MB (sparse + dense) | {megabytes(sizes['sparse_optimizer_state_bytes'])} + "
        f"{megabytes(sizes['dense_optimizer_state_bytes'])} | "
        + " | ".join(megabytes(b.get("optimizer_state_bytes")) if b else "-" for b in baseline_bytes)
        + " | | | |",
        "| page faults MB / step | "
        + " | ".join(_fmt(record["page_fault_mb_per_step"].get(name))
                     for name in ("project", "baseline", "savvy", "savvy_compiled")) + " | | | |",
        f"| peak RSS MB (whole run / own process) | {record['memory']['peak_rss_bytes'] / 2**20:,.0f} | "
        + " | ".join(megabytes(record["memory"].get(name + "_process_peak_rss_bytes"))
                     for name in ("baseline", "savvy_baseline", "savvy_compiled_baseline")) + " | | | |",
        "",
        *limit_lines(record),
        "",
        "| set arch and GEMM | value | |",
        "|---|---|---|",
        f"| interaction arch GFLOP/s (fwd+bwd) | {_fmt(record['interaction_gflops'])} | "
        f"{_fmt(record['interaction_vs_gemm'], 2)} of GEMM |",
        f"| fp32 GEMM {'x'.join(map(str, record['set_arch']['gemm_shape']))} GFLOP/s | {_fmt(record['gemm_gflops'])} | |",
    ]
    if "gemm_gflops_bf16" in record["set_arch"]:
        lines.append(f"| bf16 GEMM, same shape, GFLOP/s | {_fmt(record['set_arch']['gemm_gflops_bf16'])} | |")
    if "per_set_loop_ms" in record["set_arch"]:
        lines.append(
            f"| set arch fwd+bwd ms: batched / per-set loop | {_fmt(record['set_arch']['interaction_ms'])} / "
            f"{_fmt(record['set_arch']['per_set_loop_ms'])} | {_fmt(record['set_arch']['batched_vs_loop_speedup'], 2)}x |"
        )
    for name, row in record.get("layouts", {}).items():
        lines.append(f"| layout {name}: samples/s | {_fmt(row['samples_per_s'], 0)} | |")
    precisions = record.get("precisions")
    if precisions:
        lines.append(f"| bf16 / fp32 samples/s (interleaved) | {_fmt(precisions['bf16']['samples_per_s'], 0)} / "
                     f"{_fmt(precisions['fp32']['samples_per_s'], 0)} | {_fmt(precisions['bf16_speedup'], 2)}x |")
    breakdown = record["breakdown"]
    lines += [
        "",
        f"Step-time breakdown, ms ({breakdown['method']}; project: {breakdown['steps']} steps, sum "
        f"{_fmt(breakdown['step_ms_instrumented'])} ms = {_fmt(breakdown['sum_vs_step'], 3)} of the step):",
        "",
        "| phase | project | paper baseline | savvy baseline |",
        "|---|---|---|---|",
    ]
    paper_parts = record.get("baseline_breakdown_ms", {})
    savvy_parts = record.get("savvy_baseline_breakdown_ms", {})
    for part in PHASES:
        lines.append(f"| {part} | {_fmt(record['breakdown_ms'].get(part))} | {_fmt(paper_parts.get(part))} | "
                     f"{_fmt(savvy_parts.get(part))} |")
    lines += memory_lines(record)
    if record.get("scaling_k"):
        lines += ["", "| K | step ms | samples/s | GFLOP/step | GFLOP/s | time ratio | FLOP ratio |",
                  "|---|---|---|---|---|---|---|"]
        for row in record["scaling_k"]:
            lines.append(
                f"| {row['num_sets']} | {_fmt(row['step_ms'])} | {_fmt(row['samples_per_s'], 0)} | "
                f"{_fmt(row['gflop_per_step'], 2)} | {_fmt(row['achieved_gflops'])} | {_fmt(row['time_ratio'], 2)} | "
                f"{_fmt(row['flops_ratio'], 2)} |"
            )
    if record.get("scaling_batch"):
        lines += ["", "| batch | step ms | samples/s | GFLOP/s |", "|---|---|---|---|"]
        for row in record["scaling_batch"]:
            lines.append(
                f"| {row['batch_size']} | {_fmt(row['step_ms'])} | {_fmt(row['samples_per_s'], 0)} | "
                f"{_fmt(row['achieved_gflops'])} |"
            )
    load = record["conditions"]
    lines += ["", f"Load average at start / end: {load['load_average_start'][0]:.2f} / "
                  f"{load.get('load_average_end', [float('nan')])[0]:.2f} on {load['cpu_count']} CPUs ({load['cpu']})."]
    return "\n".join(lines)


def write_json(record: Mapping[str, Any], path: str) -> None:
    """Writes ``record`` to ``path`` atomically (temp name, then rename)."""
    from multiembed.data.metadata import atomic_write_text

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(record, indent=2, default=str) + "\n")
