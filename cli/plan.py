"""``multiembed plan``: plans the sharding of a model for a topology on paper, without its hardware.

Prints one line per embedding table (rows, width, sharding, kernel, ranks, bytes), memory per rank (embedding
weights + optimizer state) and the estimated communication per step; refuses in one line (exit status 2) when no
plan fits. ``--json OUT`` also writes the full summary.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from multiembed.cli.deprecated import add_deprecated_alias
from multiembed.config import ShardingStrategy, TrainConfig, add_arguments

# The run options that decide what is planned (the model and its tables' optimizer state).
PLAN_MODEL_OPTIONS = (
    "model", "hidden", "layout", "dense_features", "sparse_optimizer", "table_dtype", "experts", "combiner",
)

# The run options `plan` takes as `multiembed train` does.
PLAN_OPTIONS = ("sharding", "batch_size", *PLAN_MODEL_OPTIONS)

DEFAULT_HOST_SIZE = 8


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan how a model's embedding tables shard over a topology (on paper)",
        description=(
            "Builds MODEL for the vocabulary of --data on the meta device (nothing is allocated) and plans its "
            "embedding tables over --world-size ranks with TorchRec's planner, for a GPU topology by default even on "
            "a machine without one. Prints the sharding of every table, memory per rank (embedding weights + "
            "optimizer state) and the estimated communication per step; exits with status 2 and a one-line reason "
            "when no plan fits."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        help="dataset preset (criteo-kaggle, criteo-1tb, avazu) or a converted dataset directory",
    )
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs or CPU processes)")
    p.add_argument(
        "--local-world-size",
        type=int,
        default=None,
        help=f"ranks per host (default: {DEFAULT_HOST_SIZE} when it divides --world-size, else --world-size)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device of each rank (default: cuda)")
    p.add_argument("--hbm-gb", type=float, default=None,
                   help="GPU memory per rank in GiB (default: this machine's GPU's; TorchRec's 32 without a GPU)")
    p.add_argument("--ddr-gb", type=float, default=None,
                   help="host memory per rank in GiB (default: this machine's MemTotal or cgroup limit, divided by "
                   "--local-world-size)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="TABLE=STRATEGY",
        help="sharding strategy for one table (repeatable)",
    )
    p.add_argument(
        "--set-width",
        type=int,
        default=None,
        help="column-shard width (default: the model's stored width of one embedding set)",
    )
    p.add_argument(
        "--multi-hot",
        action="store_true",
        help="size inputs for the preset's multi-hot variant (criteo-1tb: MLPerf DLRM-DCNv2 ids per sample)",
    )
    # The model, sharding, batch and optimizer options are the trainer's own (same spelling, same meaning), so the
    # plan sizes what `multiembed train` would run.
    add_arguments(p, TrainConfig, PLAN_OPTIONS)
    add_deprecated_alias(p, "--strategy", "--sharding")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the plan summary as JSON to OUT")
    p.set_defaults(func=run)


def parse_overrides(items: List[str]) -> Dict[str, str]:
    """``["t1=row_wise", ...]`` -> ``{"t1": "row_wise"}``.

    Raises:
        ValueError: an item without ``=``, an empty table name, or a table given twice.
    """
    overrides: Dict[str, str] = {}
    for item in items:
        table, sep, strategy = item.partition("=")
        if not sep or not table.strip() or not strategy.strip():
            raise ValueError(f"--override {item!r}: expected TABLE=STRATEGY")
        if table.strip() in overrides:
            raise ValueError(f"--override: table {table.strip()!r} given twice")
        overrides[table.strip()] = ShardingStrategy.parse(strategy.strip(), where=f"--override {item!r}").value
    return overrides


def resolve_data(data: str, multi_hot: bool) -> Tuple[str, Dict[str, int], int, Optional[Dict[str, float]], bool]:
    """Vocabulary of a preset or a converted directory.

    Returns:
        ``(label, vocab_sizes, num_dense, pooling_factors or None, exact)``; ``exact`` is False when the preset's
        vocabulary sizes are estimates.

    Raises:
        ValueError: neither a preset nor a directory, or ``--multi-hot`` without multi-hot sizes.
        DatasetError: a directory that is not a complete converted dataset.
    """
    from multiembed.data.metadata import read_metadata
    from multiembed.data.presets import DATASET_PRESETS

    if data in DATASET_PRESETS:
        preset = DATASET_PRESETS[data]
        pooling = None
        if multi_hot:
            if not preset.multi_hot_sizes:
                raise ValueError(f"--multi-hot: preset {data!r} has no multi-hot variant")
            pooling = {k: float(v) for k, v in preset.multi_hot_sizes.items()}
        return data, dict(preset.vocab_sizes), preset.num_dense, pooling, preset.exact
    if os.sep in data or os.path.exists(data):
        if multi_hot:
            raise ValueError("--multi-hot: applies to dataset presets only")
        meta = read_metadata(data)
        return str(data), meta.vocab_sizes, len(meta.dense_fields), None, True
    raise ValueError(
        f"--data {data!r}: neither a dataset preset ({', '.join(DATASET_PRESETS)}) nor a converted dataset directory"
    )


def default_local_world_size(world_size: int) -> int:
    return DEFAULT_HOST_SIZE if world_size % DEFAULT_HOST_SIZE == 0 else world_size


def run(args: argparse.Namespace) -> int:
    from multiembed.data.metadata import atomic_write_text
    from multiembed.sharding import build_topology, format_summary
    from multiembed.sharding.planner import GB
    from multiembed.sharding.report import format_bytes
    import torch

    from multiembed.training.build import account_memory, plan_model
    from multiembed.training.memory import planning_capacity

    if args.json:
        from multiembed.data.owners import check_file_out, json_with_keys

        check_file_out(args.json, "--json", json_with_keys("request", "memory_per_rank"), "a plan summary")
    overrides = parse_overrides(args.override)
    label, vocab_sizes, num_dense, pooling, exact = resolve_data(args.data, args.multi_hot)
    local_world_size = args.local_world_size or default_local_world_size(args.world_size)
    config = TrainConfig(
        data=label, out="", **{name: getattr(args, name) for name in PLAN_OPTIONS},
    )
    config.validate()
    local_batch = config.local_batch_size(args.world_size)
    # The capacity the planner works with: what was given, else this machine's memory per rank.
    machine = planning_capacity(args.device, local_world_size)
    hbm_gb = args.hbm_gb if args.hbm_gb is not None else machine.hbm_gb
    ddr_gb = args.ddr_gb if args.ddr_gb is not None else machine.ddr_gb
    given = [f"--{name}-gb" for name, value in (("hbm", args.hbm_gb), ("ddr", args.ddr_gb)) if value is not None]
    source = ", ".join(given) if given else machine.source
    topology = build_topology(args.world_size, local_world_size, args.device, hbm_gb=hbm_gb, ddr_gb=ddr_gb)
    storage = topology.devices[0].storage
    capacity = (storage.hbm if args.device == "cuda" else storage.ddr) / GB
    num_dense = num_dense if config.dense_features else 0
    account = account_memory(config, vocab_sizes, num_dense=num_dense, device_type=args.device,
                             world_size=args.world_size, batch_size=local_batch)
    if account.per_rank_bytes > capacity * GB:
        raise ValueError(
            f"--model {args.model}: needs about {format_bytes(account.per_rank_bytes)} per rank "
            f"({account.describe()}); a rank of this plan has {format_bytes(int(capacity * GB))} ({source}); "
            "use a smaller model, more ranks or a larger --hbm-gb / --ddr-gb"
        )
    planned = plan_model(
        config,
        vocab_sizes,
        num_dense=num_dense,
        world_size=args.world_size,
        local_world_size=local_world_size,
        device_type=args.device,
        batch_size=local_batch,
        overrides=overrides,
        set_width=args.set_width,
        hbm_gb=hbm_gb,
        ddr_gb=ddr_gb,
        pooling_factors=pooling,
        capacity_gb=capacity,
        dense_device=torch.device("meta"),  # planned on paper: a model too big for this machine still plans
        dense_tensor_estimate=account.dense_bytes + account.activation_bytes,
    )
    summary = planned.summary
    sparse_optimizer = planned.optim_config.sparse_optimizer
    summary["request"] = {
        "model": args.model,
        "data": label,
        "vocabulary_exact": exact,
        "strategy": config.sharding,
        "overrides": overrides,
        "sparse_optimizer": sparse_optimizer,
        "multi_hot": bool(args.multi_hot),
    }
    estimate = "" if exact else " (vocabulary sizes are estimates)"
    print(
        f"{args.model} on {label}{estimate}: {sum(vocab_sizes.values()):,} ids over {len(vocab_sizes)} fields; "
        f"strategy {config.sharding}; sparse optimizer {sparse_optimizer}; {args.device}"
    )
    summary["memory_per_rank"] = {"bytes": account.per_rank_bytes, "tables": account.table_bytes,
                                  "dense": account.dense_bytes, "activations": account.activation_bytes}
    print(f"memory per rank: about {format_bytes(account.per_rank_bytes)} ({account.describe()}); capacity "
          f"{format_bytes(int(capacity * GB))} per rank ({source})")
    summary["capacity_per_rank"] = {"bytes": int(capacity * GB), "source": source}
    print(format_summary(summary))
    if args.json:
        out = Path(args.json)
        atomic_write_text(out, json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {out}")
    return 0
