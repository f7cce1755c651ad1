"""``multiembed bench``: training throughput against the plain-PyTorch baseline, breakdown, scaling (JSON + markdown).

The harness is :mod:`multiembed.benchmarks.bench_train` (``benchmarks/`` installs as ``multiembed.benchmarks``).
"""

from __future__ import annotations

import argparse
from typing import Any, List

from multiembed.config import TrainConfig, add_arguments


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark training throughput against the paper-style plain-PyTorch baseline",
        description=(
            "Times full training steps of a zoo model (DMP + fused sparse optimizer + dense Adam, the trainer's path) "
            "on synthetic Criteo-shaped batches, interleaved with plain-PyTorch baselines (dcnv2 models: the paper's "
            "code, and a savvy rewrite with the package's table optimizer, eager and under torch.compile); also the "
            "step-time breakdown measured inside real steps, the step's efficiency against the best GEMM rate "
            "measured in the same run and its ceiling, the set interaction arch against an fp32 GEMM, fused vs "
            "per-set tables, batched vs per-set-loop set arch, and step time vs K and vs batch size. Writes JSON "
            "(--json) and prints a markdown table."
        ),
    )
    p.add_argument("--model", default="dcnv2-me-4x", help="zoo model name (default dcnv2-me-4x)")
    p.add_argument(
        "--rows-per-set", type=int, default=1_100_000,
        help="embedding rows per set, spread over Criteo Kaggle's 39 fields in its proportions (default 1.1M)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per contender and sweep point (default 20)")
    p.add_argument("--block-steps", type=int, default=2, help="steps per interleaved block (default 2)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per contender (default 2)")
    p.add_argument("--json", required=True, metavar="OUT", help="where to write the JSON result")
    p.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=None,
        help="run the plain-PyTorch baseline interleaved (default: on for dcnv2 models)",
    )
    p.add_argument("--no-compiled-baseline", action="store_true",
                   help="skip the savvy baseline under torch.compile (its compile takes minutes on a few cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: K in {1, 2}, two batch sizes, fewer repetitions")
    p.add_argument("--no-layout-comparison", action="store_true", help="skip the other table layout")
    p.add_argument("--no-scaling", action="store_true", help="skip the K and batch-size sweeps")
    p.add_argument("--k-values", type=_int_list, default=[1, 2, 4, 10], help="K sweep (default 1,2,4,10)")
    p.add_argument("--batch-sizes", type=_int_list, default=[512, 1024, 2048, 4096],
                   help="batch-size sweep (default 512,1024,2048,4096)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--id-exponent", type=float, default=3.0,
                   help="ids are floor(D * u**a) for uniform u (default 3: a heavy head; 1: uniform)")
    p.add_argument(
        "--malloc", choices=["default", "train", "retain"], default="train",
        help="glibc's allocator in every contender's process: train (the default): as multiembed train sets it "
        "(blocks up to 32 MiB stay in the heap); retain: no freed memory is ever unmapped (fewest page faults, "
        "largest peak); default: the process as started",
    )
    p.add_argument("--profile", default=None, metavar="TXT", help="also write torch.profiler's operator table here")
    # The options a benchmark shares with a training run: defined once, in TrainConfig.
    add_arguments(
        p, TrainConfig,
        ["batch_size", "hidden", "dropout", "layout", "sharding", "seed", "device", "precision", "table_dtype"],
    )
    p.add_argument("--no-precision-comparison", action="store_true",
                   help="with --precision bf16: skip the interleaved fp32 run of the same model")
    p.add_argument(
        "--memory", action="store_true",
        help="also measure bytes per table row: peak RSS of short runs at --memory-rows sizes, each contender in a "
        "fresh process (the savvy baseline and the package at each --memory-variants)",
    )
    p.add_argument("--memory-only", action="store_true",
                   help="only the --memory phase (no throughput, baselines or breakdown)")
    p.add_argument("--memory-rows", type=_int_list, default=[2_000_000, 8_000_000],
                   help="rows per set of the memory probes (default 2000000,8000000)")
    p.add_argument("--memory-steps", type=int, default=3, help="training steps per memory probe (default 3)")
    p.add_argument("--memory-budget-gib", type=float, default=24.0,
                   help="memory budget for the largest rows per set that trains (default 24)")
    p.add_argument("--memory-variants", type=lambda t: [v for v in t.split(",") if v],
                   default=["adagrad:fp32", "rowwise_adagrad:fp32", "adagrad:fp16", "rowwise_adagrad:fp16"],
                   help="the package's memory contenders as SPARSE_OPTIMIZER:TABLE_DTYPE (default adagrad:fp32,"
                   "rowwise_adagrad:fp32,adagrad:fp16,rowwise_adagrad:fp16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def load_harness() -> Any:
    """The benchmark harness module (imports torch and torchrec)."""
    from multiembed.benchmarks import bench_train

    return bench_train


def command_line(args: argparse.Namespace) -> List[str]:
    """The options of this run as ``multiembed bench`` arguments (recorded with the results)."""
    words: List[str] = []
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "baseline":
            words.append("--baseline" if value else "--no-baseline")
        elif value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return words


def run(args: argparse.Namespace) -> int:
    from multiembed.data.owners import check_file_out, json_with_keys
    from multiembed.training.distributed import destroy

    check_file_out(args.json, "--json", json_with_keys("config", "conditions"), "a benchmark result")
    if args.profile is not None:
        check_file_out(args.profile, "--profile")
    harness = load_harness()
    config = harness.BenchConfig(
        model=args.model,
        batch_size=args.batch_size,
        rows_per_set=args.rows_per_set,
        steps=args.steps,
        block_steps=args.block_steps,
        warmup_steps=args.warmup_steps,
        baseline=args.baseline,
        compiled_baseline=not args.no_compiled_baseline,
        quick=args.quick,
        layout=args.layout,
        compare_layouts=not args.no_layout_comparison,
        scaling=not args.no_scaling,
        k_values=tuple(args.k_values),
        batch_sizes=tuple(args.batch_sizes),
        hidden=args.hidden,
        dropout=args.dropout,
        sharding=args.sharding,
        threads=args.threads,
        id_exponent=args.id_exponent,
        seed=args.seed,
        device=args.device,
        malloc=args.malloc,
        profile=args.profile,
        progress=not args.no_progress,
        precision=args.precision,
        table_dtype=args.table_dtype,
        compare_precision=not args.no_precision_comparison,
        memory=args.memory,
        memory_only=args.memory_only,
        memory_rows=tuple(args.memory_rows),
        memory_steps=args.memory_steps,
        memory_budget_gib=args.memory_budget_gib,
        memory_variants=tuple(args.memory_variants),
    )
    try:
        record = harness.run_benchmark(config, command_line(args))
        import torch.distributed as dist

        from multiembed.benchmarks.bench_train_report import format_table, write_json

        if not dist.is_initialized() or dist.get_rank() == 0:
            write_json(record, args.json)
            print(format_table(record))
    finally:
        destroy()
    return 0
